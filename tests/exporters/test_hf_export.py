"""The Hugging Face export: loads with trust_remote_code, matches the reference forward, and
generate() gives Ponder's greedy tokens, at full depth and with per-token exits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exporters.hf import export_hf
from runtime.generate import generate
from runtime.model import ExitSpec
from tests.exporters.models import KV_FILLS, SCHEDULES, adapted_checkpoint, tiny_checkpoint


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize("kv_fill", KV_FILLS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_logits_and_greedy_generation_match_ponder(tmp_path, schedule, kv_fill):
    ckpt, price = tiny_checkpoint(schedule, kv_fill)
    hf = load(export_hf(ckpt, tmp_path / "hf"))
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for exit in (ExitSpec(), ExitSpec(price=price)):
            ref = ckpt.model(ids, exit)
            kwargs = {} if exit.price is None else {"exit_price": price}
            out = hf(ids, use_cache=False, **kwargs)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
            assert torch.equal(out.exit_depths, ref.depth)
            # Incrementally, through the cache: the first 9 tokens, then the rest.
            first = hf(ids[:, :9], use_cache=True, **kwargs)
            rest = hf(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True, **kwargs)
            torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), ref.logits, rtol=1e-4, atol=1e-5)
        if exit.price is not None:
            assert len(ref.depth.unique()) > 1  # exits really differ per token
        prompt = ids[:1, :5]
        for kwargs, exit in (({}, ExitSpec()), ({"exit_price": price}, ExitSpec(price=price))):
            tokens = hf.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt), **kwargs)
            assert tokens[0, 5:].tolist() == generate(ckpt.model, prompt[0].tolist(), 10, exit).token_ids


def test_exit_step_bias_and_exit_adapters_match_ponder(tmp_path):
    ckpt, price = adapted_checkpoint()
    hf = load(export_hf(ckpt, tmp_path / "hf"))
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ckpt.model(ids, ExitSpec(price=price))
        out = hf(ids, use_cache=False, exit_price=price)
    assert len(ref.depth.unique()) > 1
    assert torch.equal(out.exit_depths, ref.depth)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_export_directory_is_self_contained(tmp_path):
    ckpt, price = tiny_checkpoint("fixed", "propagate")
    out = export_hf(ckpt, tmp_path / "hf", compute_budget=0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ponder.PonderForCausalLM"
    assert {p.name for p in out.iterdir()} >= {"config.json", "modeling_ponder.py", "model.safetensors", "tokenizer.json"}
    source = (out / "modeling_ponder.py").read_text()
    assert "from runtime" not in source and "import runtime" not in source and "exporters" not in source
    # The budget in the config maps through the calibration table to the price of depth fraction 0.5.
    hf = load(out)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ckpt.model(ids, ExitSpec(price=price)).logits, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="compute_budget"):
            hf(ids, compute_budget=1.5)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer("abc").input_ids == ckpt.tokenizer.encode("abc").ids


def test_unsupported_config_fields_are_refused(tmp_path):
    ckpt, _ = tiny_checkpoint("fixed", "propagate")
    with pytest.raises(ValueError, match="compute_budget"):
        export_hf(ckpt, tmp_path / "hf", compute_budget=0.0)


def test_export_command_writes_a_loadable_directory(tmp_path):
    from ponder.cli import main
    from runtime.checkpoint import save_checkpoint

    ckpt, _ = tiny_checkpoint("recurrent", "latest")
    save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.tokenizer, ckpt.calibration)
    assert main(["export", "--format", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "hf")(ids).logits, ckpt.model(ids).logits, rtol=1e-4, atol=1e-5)
    assert main(["export", "--format", "hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert main(["export", "--format", "onnx", "--exit-price", "1", str(tmp_path / "ckpt"), str(tmp_path / "x")]) == 2
