"""Per-token cost model in multiply-accumulates, for "ideal" speedups and compute fractions.

Everything a token pays is counted: its layers, the exit tests it makes, the K/V projections that
fill its skipped slots, its exit adapter and the LM head; and, given the context it attends over,
its attention scores and weighted sums in every layer it runs (an exited token attends no deeper).
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
        "attention_per_key": 2 * cfg.n_heads * cfg.head_dim,  # q.k and the weighted v, per layer and key
    }


def token_macs(cfg: ModelConfig, depth: float, exit_tests: bool = True, context: float = 0.0) -> float:
    """MACs of one token that ran `depth` core steps (a mean depth is fine: the model is linear in it).
    exit_tests: the exit head was evaluated at each step from min_depth on (False at full depth
    with no price, where the engine skips the exit head). context: keys it attends over per layer."""
    m, D = piece_macs(cfg), cfg.max_depth
    layers = cfg.n_prelude + depth + cfg.n_coda
    cost = layers * (m["layer"] + context * m["attention_per_key"]) + m["head"]
    if exit_tests:
        cost += max(depth - cfg.min_depth + 1, 0) * m["exit_head"]
    if depth < D:
        cost += m["adapter"] + (D - depth) * (m["kv_proj"] if cfg.kv_fill.fills_by_projection else 0)
    return cost
