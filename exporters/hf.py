"""A Ponder checkpoint as a Hugging Face model directory, loadable with trust_remote_code.

    out/config.json            PonderConfig, with auto_map to modeling_ponder.py
    out/modeling_ponder.py     self-contained model code (torch + transformers, no Ponder import)
    out/model.safetensors      the same tensor names as Ponder's, head weight written out
    out/tokenizer.json, tokenizer_config.json, generation_config.json

AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).generate(...) runs at full
depth by default, or with per-token exits given `exit_price=` or `compute_budget=`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from runtime.checkpoint import Checkpoint
from runtime.config import ModelConfig

MODELING_FILE = Path(__file__).parent / "hf_remote" / "modeling_ponder.py"

# ModelConfig fields that modeling_ponder.py implements; any other field must keep its default.
SUPPORTED_FIELDS = (
    "vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "n_prelude", "n_coda", "n_pool", "max_depth",
    "min_depth", "schedule", "kv_fill", "step_embedding", "block_embedding", "exit_hidden", "exit_step_bias",
    "exit_adapter_rank", "max_seq_len", "rope_theta", "norm_eps",
)
# Fields that do not change the computation.
IGNORED_FIELDS = ("tie_embeddings", "bos_id", "eos_id", "pad_id", "think_start_id", "think_end_id",
                  "format_version", "notes")


def hf_config(ckpt: Checkpoint, exit_price: float | None = None, compute_budget: float | None = None) -> dict:
    cfg = ckpt.config
    defaults = ModelConfig()
    unsupported = [f.name for f in dataclasses.fields(cfg) if f.name not in SUPPORTED_FIELDS + IGNORED_FIELDS
                   and getattr(cfg, f.name) != getattr(defaults, f.name)]
    if unsupported:
        raise ValueError(f"the Hugging Face export does not implement config fields {unsupported} yet")
    if compute_budget is not None and not 0.0 < compute_budget <= 1.0:
        raise ValueError(f"compute_budget={compute_budget} must be in (0, 1]")
    if exit_price is not None and exit_price < 0:
        raise ValueError(f"exit_price={exit_price} must be >= 0")
    return {
        "architectures": ["PonderForCausalLM"],
        "model_type": "ponder",
        "auto_map": {"AutoConfig": "modeling_ponder.PonderConfig",
                     "AutoModelForCausalLM": "modeling_ponder.PonderForCausalLM"},
        **{name: value for name, value in cfg.to_dict().items() if name in SUPPORTED_FIELDS},
        "exit_price": exit_price,
        "compute_budget": compute_budget,
        "calibration": {"prices": ckpt.calibration.prices, "depth_fractions": ckpt.calibration.depth_fractions},
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def export_hf(ckpt: Checkpoint, out: str | Path, exit_price: float | None = None,
              compute_budget: float | None = None) -> Path:
    """Write the Hugging Face directory for `ckpt` to `out` (created; existing files overwritten)."""
    out = Path(out)
    config = hf_config(ckpt, exit_price, compute_budget)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(MODELING_FILE, out / "modeling_ponder.py")
    state = {name: t.detach().float().cpu().clone().contiguous() for name, t in ckpt.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = ckpt.config
    ckpt.tokenizer.save(str(out / "tokenizer.json"))
    vocab = ckpt.tokenizer.id_to_token
    special = {name: vocab(i) for name, i in (("eos_token", cfg.eos_id), ("pad_token", cfg.pad_id),
                                              ("bos_token", cfg.bos_id)) if i is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len, **special}, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2) + "\n")
    return out
