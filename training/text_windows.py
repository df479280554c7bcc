"""Austen text as fixed-length token windows for any tokenizer (e.g. an imported model's).

train: the first 95% of each of the five training novels; val: their last 5% (calibration);
test: Persuasion, held out for evaluation.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import Tensor

from training.data.austen import BOOKS, HELDOUT, load_book

SPLITS = ("train", "val", "test")


def split_ids(tokenizer: Tokenizer, split: str) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if split == "test":
        return tokenizer.encode(load_book(HELDOUT)).ids
    ids: list[int] = []
    for name in BOOKS:
        if name == HELDOUT:
            continue
        book = tokenizer.encode(load_book(name)).ids
        cut = int(len(book) * 0.95)
        ids += book[:cut] if split == "train" else book[cut:]
    return ids


def windows(tokenizer: Tokenizer, split: str, length: int, count: int | None = None, seed: int = 0) -> Tensor:
    """(count, length) windows: consecutive and non-overlapping for val/test, random offsets for train.
    count=None takes every consecutive window of the split."""
    ids = torch.tensor(split_ids(tokenizer, split))
    if len(ids) < length:
        raise ValueError(f"split {split!r} has {len(ids)} tokens, fewer than one window of {length}")
    if split == "train" and count is not None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - length, (count,), generator=g)
    else:
        starts = torch.arange(0, len(ids) - length + 1, length)[:count]
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
