"""A tiny dense model, and an adapted checkpoint over a tiny 'imported' base in a private cache."""

import pytest
import torch
from tokenizers import Tokenizer

import runtime.base_model
from runtime.checkpoint import save_checkpoint
from runtime.config import ModelConfig
from runtime.model import PonderModel

TOKENIZER = "checkpoints/austen-small/tokenizer.json"


def dense(seed: int = 0) -> PonderModel:
    cfg = ModelConfig(vocab_size=4096, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_pool=4, max_depth=4,
                      min_depth=1, exit_adapter_rank=8, exit_step_bias=True, max_seq_len=128)
    torch.manual_seed(seed)
    return PonderModel(cfg).eval()


@pytest.fixture
def adapted(tmp_path, monkeypatch):
    """A tiny 'imported' base in a private cache and an adapted checkpoint over it (exits only)."""
    monkeypatch.setattr(runtime.base_model, "CACHE", tmp_path / "cache")
    tokenizer = Tokenizer.from_file(TOKENIZER)
    model = dense()
    save_checkpoint(runtime.base_model.cached_path("tiny-base"), model, tokenizer)
    for adapter in model.exit_adapters:  # the adapted checkpoint differs from its base in its exits only
        torch.nn.init.normal_(adapter.up.weight, std=0.01)
    return save_checkpoint(tmp_path / "init", model, tokenizer, base="tiny-base"), model
