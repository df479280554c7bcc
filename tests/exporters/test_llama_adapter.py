"""A fixed-schedule checkpoint as transformers' LlamaForCausalLM: same logits, same greedy tokens."""

import torch

from exporters.llama import to_llama
from runtime.config import ModelConfig
from runtime.generate import generate
from runtime.model import ExitSpec, PonderModel


def test_llama_adapter_matches_reference_forward_and_generation():
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=3, max_depth=3, eos_id=None)).eval()
    hf = to_llama(model)
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, ExitSpec()).logits, rtol=1e-4, atol=1e-5)
        out = hf.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert out[0, 6:].tolist() == generate(model, ids[0, :6].tolist(), 8, ExitSpec()).token_ids


def test_non_fixed_schedules_are_refused():
    import pytest

    with pytest.raises(ValueError, match="fixed"):
        to_llama(PonderModel(ModelConfig.from_name("tiny", schedule="recurrent", n_pool=1)))
