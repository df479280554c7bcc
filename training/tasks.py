"""Training tasks: the seed's local-vs-global digit task, modular addition, and Austen text.

A task yields (ids, targets) batches; targets hold -100 where no loss is taken. Batches are a
pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import Tensor

from training.data import austen

IGNORE = -100


def symbol_tokenizer(symbols: list[str]) -> Tokenizer:
    """A word-level tokenizer over a fixed symbol list (symbol i gets id i); text is split into symbols."""
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token=None))
    pattern = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return tokenizer


@dataclass
class Task:
    name: str
    tokenizer: Tokenizer
    seq_len: int
    train: Tensor  # examples (N, T+1) or a token stream (N,)
    valid: Tensor
    test: Tensor
    answer_only: bool  # loss on the final position only (classification-style tasks)
    groups: dict[str, Tensor] = field(default_factory=dict)  # test-example labels, e.g. mode
    special_ids: dict[str, int] = field(default_factory=dict)
    config_fields: dict[str, Any] = field(default_factory=dict)  # other ModelConfig fields the task sets
    # Optional curriculum: (training sequences, progress in [0, 1], generator) -> sequences.
    curriculum: Callable[[Tensor, float, torch.Generator], Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def pair(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        ids, targets = seqs[:, :-1], seqs[:, 1:].clone()
        if self.answer_only:
            targets[:, :-1] = IGNORE
        return ids, targets

    def train_batch(self, batch_size: int, generator: torch.Generator, progress: float = 1.0) -> tuple[Tensor, Tensor]:
        if self.train.dim() == 2:
            rows = torch.randint(len(self.train), (batch_size,), generator=generator)
            seqs = self.train[rows]
            if self.curriculum is not None:
                seqs = self.curriculum(seqs, progress, generator)
            return self.pair(seqs)
        starts = torch.randint(len(self.train) - self.seq_len - 1, (batch_size,), generator=generator)
        return self.pair(torch.stack([self.train[s : s + self.seq_len + 1] for s in starts.tolist()]))

    def train_mask(self, ids: Tensor, generator: torch.Generator) -> Tensor | None:
        """The (B, 1, T, T) attention mask a training batch runs with; None is causal."""
        return None

    def batches(self, split: str, batch_size: int, max_tokens: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Deterministic held-out batches ('valid' or 'test'); a stream is cut into windows."""
        data = {"valid": self.valid, "test": self.test}[split]
        if data.dim() == 2 and max_tokens is not None:
            data = data[: max(1, max_tokens // self.seq_len)]
        if data.dim() == 1:
            n = (len(data) - 1) // self.seq_len
            if max_tokens is not None:
                n = min(n, max(1, max_tokens // self.seq_len))
            data = torch.stack([data[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in range(n)])
        for i in range(0, len(data), batch_size):
            yield self.pair(data[i : i + batch_size])


# ----- the seed's "local vs global" digit task -----

MODE_LOCAL, MODE_GLOBAL = 10, 11


def _digit_sequences(modes: Tensor, digits: Tensor) -> Tensor:
    """[mode, d1..d5, answer]; the answer token follows the digits and alone carries loss."""
    answer = torch.where(modes == MODE_LOCAL, digits[:, -1], digits.sum(1) % 10)
    return torch.cat([modes[:, None], digits, answer[:, None]], dim=1)


def _digit_keys(seqs: Tensor) -> Tensor:
    return seqs[:, 0] * 100_000 + (seqs[:, 1:6] * torch.tensor([10_000, 1000, 100, 10, 1])).sum(1)


def digits_curriculum(held_out: Tensor, ramp: float = 0.5) -> Callable[[Tensor, float, torch.Generator], Tensor]:
    """Zero the leading digits of training examples so early training sums 1-2 digits, growing to
    all 5 by `ramp` of the run; after that, ever more examples stay untouched (all at the end). Sums of two digits mod 10 are learnt fast
    and teach the digit-value code the 5-digit sum needs; direct training on 5 digits plateaus.
    Examples that would land in a held-out split are left unchanged."""
    held_keys = _digit_keys(held_out)

    def apply(seqs: Tensor, progress: float, generator: torch.Generator) -> Tensor:
        k_max = min(5, 2 + int(progress / ramp * 3))
        k = torch.randint(1, k_max + 1, (len(seqs),), generator=generator)
        digits = seqs[:, 1:6].masked_fill(torch.arange(5)[None] < (5 - k)[:, None], 0)
        easier = _digit_sequences(seqs[:, 0], digits)
        keep = torch.isin(_digit_keys(easier), held_keys)
        if progress >= ramp:
            keep_fraction = 0.5 + 0.5 * (progress - ramp) / max(1 - ramp, 1e-9)
            keep |= torch.rand(len(seqs), generator=generator) < keep_fraction
        return torch.where(keep[:, None], seqs, easier)

    return apply


def digits_task(train_size: int = 100_000, valid_size: int = 10_000, test_size: int = 10_000, seed: int = 0,
                curriculum: bool = True) -> Task:
    """[mode, d1..d5] -> last digit (local, easy) or sum mod 10 (global, hard).

    All 200k inputs are enumerated and shuffled once, so the splits are disjoint.
    """
    digits = torch.tensor(list(itertools.product(range(10), repeat=5)))
    modes = torch.cat([torch.full((len(digits),), MODE_LOCAL), torch.full((len(digits),), MODE_GLOBAL)])
    seqs = _digit_sequences(modes, torch.cat([digits, digits]))
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    seqs = seqs[order]
    train, valid = seqs[:train_size], seqs[train_size : train_size + valid_size]
    test = seqs[train_size + valid_size : train_size + valid_size + test_size]
    symbols = [str(d) for d in range(10)] + ["<local>", "<global>"]
    return Task(
        name="digits", tokenizer=symbol_tokenizer(symbols), seq_len=6, train=train, valid=valid, test=test,
        answer_only=True, groups={"local": test[:, 0] == MODE_LOCAL, "global": test[:, 0] == MODE_GLOBAL},
        curriculum=digits_curriculum(torch.cat([valid, test])) if curriculum else None,
    )


# ----- modular addition -----

def modadd_task(p: int = 97, train_fraction: float = 0.5, seed: int = 0) -> Task:
    """[a, +, b, =] -> (a + b) mod p, with a held-out fraction of all p^2 pairs."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    plus, equals = p, p + 1
    seqs = torch.stack([a, torch.full_like(a, plus), b, torch.full_like(a, equals), (a + b) % p], dim=1)
    seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]
    n_train = int(len(seqs) * train_fraction)
    n_valid = (len(seqs) - n_train) // 2
    symbols = [str(i) for i in range(p)] + ["+", "="]
    return Task(
        name="modadd", tokenizer=symbol_tokenizer(symbols), seq_len=4, train=seqs[:n_train],
        valid=seqs[n_train : n_train + n_valid], test=seqs[n_train + n_valid :], answer_only=True,
    )


# ----- Jane Austen -----

def austen_task(vocab_size: int = 4096, seq_len: int = 256, valid_fraction: float = 0.05) -> Task:
    """Five novels for training (the last 5% of their tokens for validation/calibration); Persuasion is test."""
    tokenizer = austen.train_bpe_tokenizer(austen.train_text(), vocab_size=vocab_size)

    def encode(text: str) -> Tensor:
        pieces = text.split("\n\n")
        encoded = tokenizer.encode_batch([p + "\n\n" for p in pieces[:-1]] + pieces[-1:])
        return torch.tensor([i for e in encoded for i in e.ids], dtype=torch.long)

    stream = encode(austen.train_text())
    n_valid = int(len(stream) * valid_fraction)
    special = {t: tokenizer.token_to_id(t) for t in austen.SPECIAL_TOKENS}
    return Task(
        name="austen", tokenizer=tokenizer, seq_len=seq_len, train=stream[:-n_valid], valid=stream[-n_valid:],
        test=encode(austen.heldout_text()), answer_only=False,
        special_ids={"eos_id": special["<|endoftext|>"], "pad_id": special["<|pad|>"],
                     "think_start_id": special["<think>"], "think_end_id": special["</think>"]},
    )


def _addition_task(**kwargs) -> Task:
    from training.thought_tasks import addition_task  # it imports this module

    return addition_task(**kwargs)


def _swap_task(**kwargs) -> Task:
    from training.swap_task import swap_task  # it imports this module

    return swap_task(**kwargs)


TASKS = {"digits": digits_task, "modadd": modadd_task, "austen": austen_task, "addition": _addition_task,
         "swaps": _swap_task}


def make_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
