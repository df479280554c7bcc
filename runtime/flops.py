"""Per-token cost model in multiply-accumulates, for "ideal" speedups and compute fractions.

Attention scores are left out (they grow with context and are the same at every budget for the
slots a token attends); everything else a token pays is counted: its layers, the exit tests it
makes, the K/V projections that fill its skipped slots, its exit adapter and the LM head.
"""

from __future__ import annotations

from runtime.config import ModelConfig


def piece_macs(cfg: ModelConfig) -> dict[str, int]:
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    return {
        "layer": 2 * d * d + 2 * d * kv + 3 * d * cfg.d_ff,
        "kv_proj": 2 * d * kv,
        "head": d * cfg.vocab_size,
        "exit_head": d * cfg.exit_hidden + cfg.exit_hidden,
        "adapter": 2 * d * cfg.exit_adapter_rank,
    }


def token_macs(cfg: ModelConfig, depth: float, exit_tests: bool = True) -> float:
    """MACs of one token that ran `depth` core steps (a mean depth is fine: the model is linear in it).
    exit_tests: the exit head was evaluated at each step from min_depth on (False at full depth
    with no price, where the engine skips the exit head)."""
    m, D = piece_macs(cfg), cfg.max_depth
    cost = (cfg.n_prelude + depth + cfg.n_coda) * m["layer"] + m["head"]
    if exit_tests:
        cost += max(depth - cfg.min_depth + 1, 0) * m["exit_head"]
    if depth < D:
        cost += m["adapter"] + (D - depth) * (m["kv_proj"] if cfg.kv_fill.fills_by_projection else 0)
    return cost
