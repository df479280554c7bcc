"""A fixed-schedule Ponder checkpoint as a Hugging Face LlamaForCausalLM, at full depth.

Prelude, core and coda blocks become Llama decoder layers in order. The step and block
embeddings P(s) + B(s) that Ponder adds before core step s have no Llama counterpart, so they
are added by a forward pre-hook on that layer: the model runs in-process (as a `generate()`
baseline with the same weights) but is not a standalone export. Early exit is not modelled.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from runtime.model import PonderModel


def to_llama(model: PonderModel) -> LlamaForCausalLM:
    cfg = model.cfg
    if cfg.schedule != "fixed":
        raise ValueError(f"only schedule='fixed' maps onto Llama layers; this model is {cfg.schedule!r}")
    blocks = [*model.prelude, *model.pool, *model.coda]
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=len(blocks),
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
    )
    hf = LlamaForCausalLM(hf_cfg)
    dtype = next(model.parameters()).dtype
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.head.weight}
    for i, b in enumerate(blocks):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight": b.mlp_norm.weight,
            p + "self_attn.q_proj.weight": b.attn.wq.weight, p + "self_attn.k_proj.weight": b.attn.wk.weight,
            p + "self_attn.v_proj.weight": b.attn.wv.weight, p + "self_attn.o_proj.weight": b.attn.wo.weight,
            p + "mlp.gate_proj.weight": b.mlp.w_gate.weight, p + "mlp.up_proj.weight": b.mlp.w_up.weight,
            p + "mlp.down_proj.weight": b.mlp.w_down.weight,
        }
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    for s in range(cfg.max_depth):
        offset = torch.zeros(cfg.d_model)
        if model.step_emb is not None:
            offset = offset + model.step_emb[s].detach()
        if model.block_emb is not None:
            offset = offset + model.block_emb[s].detach()
        hf.model.layers[cfg.n_prelude + s].register_forward_pre_hook(_add(offset), with_kwargs=True)
    return hf.to(dtype=dtype, device=next(model.parameters()).device).eval()


def _add(offset: torch.Tensor):
    def hook(module, args, kwargs):
        if args:
            return (args[0] + offset.to(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + offset.to(kwargs["hidden_states"])
        return args, kwargs

    return hook
