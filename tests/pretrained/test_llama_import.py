"""Importing a Llama-family model: a tiny random Llama built here, so no download is needed."""

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from runtime.base_model import import_checkpoint  # noqa: E402
from runtime.checkpoint import DEFAULT_MODEL, load_checkpoint  # noqa: E402
from runtime.llama_import import import_llama, ponder_config  # noqa: E402
from runtime.model import ExitSpec  # noqa: E402


def tiny_llama(vocab_size: int = 4096, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; perturb them so the test sees if a norm is dropped
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_MODEL / "tokenizer.json"), eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tok.save_pretrained(path)
    return path


def test_full_depth_logits_match_transformers():
    hf = tiny_llama()
    model = import_llama(hf, ponder_config(hf.config))
    ids = torch.randint(0, 4096, (2, 37))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_untied_head_and_config_mapping():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=64)
    hf = LlamaForCausalLM(cfg).eval()
    pcfg = ponder_config(hf.config, min_depth=1, exit_adapter_rank=4)
    assert (pcfg.schedule, pcfg.n_pool, pcfg.max_depth, pcfg.n_prelude, pcfg.n_coda) == ("fixed", 3, 3, 0, 0)
    assert not pcfg.step_embedding and not pcfg.block_embedding and pcfg.exit_step_bias
    model = import_llama(hf, pcfg)
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-4)
        # Fresh exit adapters start as the identity: an early exit decodes like the plain logit lens.
        out = model(ids, ExitSpec(depths=torch.full((1, 20), 1)), return_states=True)
        lens = model.head(model.norm(out.states[1]))
    assert torch.allclose(out.logits, lens, atol=1e-6)


def test_rejects_what_it_cannot_represent():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      attention_bias=True)
    with pytest.raises(ValueError, match="bias"):
        ponder_config(cfg)


def test_import_cli_writes_a_loadable_checkpoint_with_chat_template(hf_dir, tmp_path):
    from ponder.cli import main

    out = tmp_path / "imported"
    assert main(["import", str(hf_dir), "--out", str(out), "--min-depth", "1", "--exit-adapter-rank", "8"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.min_depth == 1 and ckpt.config.exit_adapter_rank == 8
    assert ckpt.chat_template.startswith("{% for m in messages %}")
    assert ckpt.tokenizer.get_vocab_size() == 4096
    ids = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        assert torch.allclose(ckpt.model(ids).logits, tiny_llama()(ids).logits, atol=1e-5, rtol=1e-4)


def test_adapted_checkpoint_ships_only_its_own_weights(hf_dir, tmp_path, monkeypatch):
    """A checkpoint with base.json stores the exit head and adapters; the base comes from the cache."""
    from runtime import base_model
    from runtime.checkpoint import save_checkpoint

    monkeypatch.setattr(base_model, "CACHE", tmp_path / "cache")
    base = base_model.base_checkpoint(str(hf_dir))
    assert base.parent == tmp_path / "cache" / "base"
    ckpt = load_checkpoint(base)
    hf = tiny_llama()
    adapted = import_llama(hf, ponder_config(hf.config, exit_adapter_rank=4))
    with torch.no_grad():
        for adapter in adapted.exit_adapters:
            adapter.up.weight.normal_()
        adapted.exit_head.out.bias.fill_(3.0)
    small = save_checkpoint(tmp_path / "small", adapted, ckpt.tokenizer, base=str(hf_dir))
    saved = set(load_file(str(small / "model.safetensors")))
    assert saved and all(k.startswith(("exit_head.", "exit_adapters.")) for k in saved)
    assert not (small / "tokenizer.json").exists()
    loaded = load_checkpoint(small)
    assert loaded.chat_template is not None and loaded.tokenizer.get_vocab_size() == 4096
    for (name, want), got in zip(adapted.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(want, got), name


def test_import_checkpoint_is_atomic_on_failure(tmp_path):
    with pytest.raises(Exception):
        import_checkpoint(str(tmp_path / "missing-dir"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out-") for p in tmp_path.iterdir())
