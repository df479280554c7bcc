"""Training tasks: the seed's local-vs-global digit task, modular addition, and Austen text.

A task yields (ids, targets) batches; targets hold -100 where no loss is taken. Batches are a
pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _pair(self, seqs: Tensor) -> tuple[Tensor, Tensor]:
        ids, targets = seqs[:, :-1], seqs[:, 1:].clone()
        if self.answer_only:
            targets[:, :-1] = IGNORE
        return ids, targets

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.train.dim() == 2:
            rows = torch.randint(len(self.train), (batch_size,), generator=generator)
            return self._pair(self.train[rows])
        starts = torch.randint(len(self.train) - self.seq_len - 1, (batch_size,), generator=generator)
        return self._pair(torch.stack([self.train[s : s + self.seq_len + 1] for s in starts.tolist()]))

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
            yield self._pair(data[i : i + batch_size])


# ----- the seed's "local vs global" digit task -----

MODE_LOCAL, MODE_GLOBAL = 10, 11


def digits_task(train_size: int = 100_000, valid_size: int = 10_000, test_size: int = 10_000, seed: int = 0) -> Task:
    """[mode, d1..d5] -> last digit (local, easy) or sum mod 10 (global, hard).

    All 200k inputs are enumerated and shuffled once, so the splits are disjoint.
    """
    digits = torch.tensor(list(itertools.product(range(10), repeat=5)))
    modes = torch.cat([torch.full((len(digits),), MODE_LOCAL), torch.full((len(digits),), MODE_GLOBAL)])
    digits = torch.cat([digits, digits])
    answer = torch.where(modes == MODE_LOCAL, digits[:, -1], digits.sum(1) % 10)
    # The answer token follows the digits; only it carries loss.
    seqs = torch.cat([modes[:, None], digits, answer[:, None]], dim=1)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    seqs = seqs[order]
    train, valid = seqs[:train_size], seqs[train_size : train_size + valid_size]
    test = seqs[train_size + valid_size : train_size + valid_size + test_size]
    symbols = [str(d) for d in range(10)] + ["<local>", "<global>"]
    return Task(
        name="digits", tokenizer=symbol_tokenizer(symbols), seq_len=6, train=train, valid=valid, test=test,
        answer_only=True, groups={"local": test[:, 0] == MODE_LOCAL, "global": test[:, 0] == MODE_GLOBAL},
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


TASKS = {"digits": digits_task, "modadd": modadd_task, "austen": austen_task}


def make_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
