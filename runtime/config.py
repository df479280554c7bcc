"""ModelConfig: the one dataclass that describes a Ponder model, written as config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.kv_fill import KVFill

# Bump when config.json or the weight layout changes in a way older code cannot read.
FORMAT_VERSION = 1

SCHEDULES = ("fixed", "recurrent", "routed")
THOUGHT_KV_MODES = ("keep", "discard")


class ConfigError(ValueError):
    """A config value a user supplied is out of range or inconsistent."""


@dataclass
class ModelConfig:
    """Shape and semantics of a Ponder model.

    A token runs: embed -> n_prelude blocks -> core steps 0..max_depth-1 (each step
    applies one block of the pool, chosen by `schedule`) -> n_coda blocks -> norm -> head.
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: n_heads must be a multiple of this
    d_ff: int = 0  # SwiGLU hidden size; 0 means round(8/3 * d_model) to a multiple of 32
    n_prelude: int = 1  # fixed blocks before the core (every token runs them)
    n_coda: int = 1  # fixed blocks after the core, run at each token's exit state
    n_pool: int = 4  # core blocks; `fixed` uses block s at step s, `recurrent` block 0
    max_depth: int = 4  # core steps a token may take
    min_depth: int = 0  # steps every token takes before it may exit (0: embed-then-decode allowed)
    schedule: str = "fixed"  # fixed | recurrent | routed
    kv_fill: KVFill = KVFill.PROPAGATE  # where an exited token's deeper KV slots come from (a str in JSON)
    step_embedding: bool = True  # add P(s) before each core step (and to router/exit inputs)
    block_embedding: bool = True  # add B(b) before block b
    exit_hidden: int = 64  # hidden width of the exit/value head MLP
    exit_step_bias: bool = False  # exit head adds a learned per-step bias (tells it the depth without P(s))
    exit_adapter_rank: int = 0  # >0: per-depth low-rank translators of an exit state before decoding
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Special token ids (None when the tokenizer has no such token).
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    think_start_id: int | None = None
    think_end_id: int | None = None
    # Thought KV modes the model was trained for, preferred first: 'keep' (thoughts stay in context)
    # and/or 'discard' (positions after the first visible token past </think> never see the thought
    # span; see runtime/thought_mask.py). Serving refuses a mode that is not listed here.
    thought_kv: list[str] = field(default_factory=lambda: ["keep"])
    # The thought length the model was trained to write; the engine's default max_thought_tokens is
    # round(compute_budget * default_thought_tokens). None: no default cap (max_tokens bounds thoughts).
    default_thought_tokens: int | None = None
    format_version: int = FORMAT_VERSION
    notes: dict[str, Any] = field(default_factory=dict)  # free-form provenance (task, training run)

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 32 * round(8 * self.d_model / 3 / 32)
        positive = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "n_pool", "max_seq_len", "exit_hidden")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("n_prelude", "n_coda", "max_depth", "min_depth", "exit_adapter_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        try:
            self.kv_fill = KVFill(self.kv_fill)
        except ValueError:
            raise ConfigError(f"kv_fill={self.kv_fill!r} must be one of {tuple(f.value for f in KVFill)}") from None
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE; change d_model or n_heads")
        if self.min_depth > self.max_depth:
            raise ConfigError(f"min_depth={self.min_depth} must be <= max_depth={self.max_depth}")
        if self.schedule == "fixed" and self.n_pool != self.max_depth:
            raise ConfigError(
                f"schedule='fixed' runs block s at step s, so n_pool ({self.n_pool}) must equal "
                f"max_depth ({self.max_depth})"
            )
        if self.schedule == "recurrent" and self.n_pool != 1:
            raise ConfigError(f"schedule='recurrent' applies one block repeatedly: n_pool={self.n_pool} must be 1")
        for name in ("bos_id", "eos_id", "pad_id", "think_start_id", "think_end_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self._check_thoughts()
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version={self.format_version} is newer than this Ponder supports "
                f"({FORMAT_VERSION}); upgrade ponder to load this checkpoint"
            )

    def _check_thoughts(self) -> None:
        modes = self.thought_kv
        if not isinstance(modes, list) or not modes or any(m not in THOUGHT_KV_MODES for m in modes) \
                or len(set(modes)) != len(modes):
            raise ConfigError(f"thought_kv={modes!r} must be a non-empty list of distinct modes from {THOUGHT_KV_MODES}")
        thinks = self.think_start_id is not None and self.think_end_id is not None
        if "discard" in modes and not thinks:
            raise ConfigError("thought_kv lists 'discard' but think_start_id/think_end_id are not set; "
                              "a model trained to discard thoughts needs both thought markers")
        if self.think_start_id is not None and self.think_start_id == self.think_end_id:
            raise ConfigError(f"think_start_id and think_end_id are both {self.think_start_id}; they must differ")
        if self.default_thought_tokens is not None:
            if not isinstance(self.default_thought_tokens, int) or self.default_thought_tokens < 0:
                raise ConfigError(f"default_thought_tokens={self.default_thought_tokens!r} must be an integer >= 0")
            if not thinks:
                raise ConfigError("default_thought_tokens is set but think_start_id/think_end_id are not")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_core_slots(self) -> int:
        """KV slots the core needs per token: one per step, or one for all with `shared`."""
        return self.kv_fill.num_slots(self.max_depth)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kv_fill": self.kv_fill.value}  # plain JSON types

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version={version!r} is newer than this Ponder supports "
                f"({FORMAT_VERSION}); upgrade ponder to load this checkpoint"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; is this a Ponder config.json?")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: 2 blocks, width 64.
    "tiny": dict(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1,
                 n_pool=2, max_depth=2, schedule="fixed", max_seq_len=64, exit_hidden=16),
    # A plain dense transformer: every token runs every layer, nothing extra is added.
    "dense-tiny": dict(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_prelude=0, n_coda=0,
                       n_pool=4, max_depth=4, min_depth=4, schedule="fixed", step_embedding=False,
                       block_embedding=False, max_seq_len=64, exit_hidden=16),
    # The seed's local-vs-global digit task: a routed pool and nothing else. No prelude, so depth is
    # what buys context; min_depth=1 because before one attention step the answer token cannot see
    # the mode token, so its exit head could not tell an easy question from a hard one.
    # (With a prelude block of width 128, one layer solves both modes and depth buys nothing.)
    "digits-routed": dict(vocab_size=12, d_model=64, n_heads=4, n_kv_heads=2, n_prelude=0, n_coda=0,
                          n_pool=4, max_depth=6, min_depth=1, schedule="routed", max_seq_len=8, exit_hidden=64),
    # The same with a fixed schedule: 6 distinct blocks, step s runs block s.
    "digits-fixed": dict(vocab_size=12, d_model=64, n_heads=4, n_kv_heads=2, n_prelude=0, n_coda=0,
                         n_pool=6, max_depth=6, min_depth=1, schedule="fixed", max_seq_len=8, exit_hidden=64),
    "modadd-routed": dict(vocab_size=99, d_model=128, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=0,
                          n_pool=4, max_depth=4, schedule="routed", max_seq_len=8, exit_hidden=64),
    # Austen text: a small fixed-schedule model whose core layers can be exited after any step.
    # About 4M parameters, 16 MB in fp32: small enough to ship in the repo.
    "austen-small": dict(vocab_size=4096, d_model=192, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1,
                         n_pool=6, max_depth=6, schedule="fixed", max_seq_len=256, exit_hidden=64),
    "austen-recurrent": dict(vocab_size=4096, d_model=192, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1,
                             n_pool=1, max_depth=6, schedule="recurrent", max_seq_len=256, exit_hidden=64),
}
