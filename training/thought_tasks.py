"""Multi-digit addition with thought chains: a task where thinking pays.

    prompt:  a_0 a_1 .. a_{n-1} + b_0 .. b_{n-1} =       (operands least significant digit first)
    output:  <think> t_0 t_1 .. t_{n-1} </think> c_n s_{n-1} .. s_0 <eos>

The answer is written most significant digit first (n+1 digits), so its first digit already
depends on the whole carry chain: hard to get right directly for a small model. The supervised
thought works the sum out least significant digit first, one token per digit: t_i is the digit
s_i = (a_i + b_i + c_i) mod 10, written as 0-9 when no carry goes out of it and as a-j (for 0-9)
when one does. Each thought token reads its operand digits at a fixed distance and the carry from
the token before it; after the thought every answer digit is a copy.

Training mixes three things, so that one checkpoint serves every thought budget and both KV modes:
- a `truncate_fraction` of examples has the thought cut at a random length k < 2n (k = 0, the
  forced immediate answer, a third of the time); no loss on the forced `</think>`;
- each example is trained with thought KV 'keep' or 'discard' (runtime/thought_mask.py), so
  both are listed in the checkpoint's `thought_kv`;
- loss only on the output (never on the random operands or padding).
Problems are drawn at random; held-out problems never appear in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders
from torch import Tensor

from runtime.thought_mask import thought_attention_mask
from training.tasks import IGNORE, Task, symbol_tokenizer

CARRY_DIGITS = [chr(ord("a") + d) for d in range(10)]  # thought digit d with a carry out of it
SYMBOLS = [str(d) for d in range(10)] + ["+", "=", "<think>", "</think>", "<eos>", "<pad>"] + CARRY_DIGITS
PLUS, EQUALS, THINK, END_THINK, EOS, PAD = range(10, 16)
CARRY_BASE = 16  # token id of carry digit 0


def addition_tokenizer() -> Tokenizer:
    tokenizer = symbol_tokenizer(SYMBOLS)
    tokenizer.decoder = decoders.Fuse()  # "1+2=" decodes without spaces
    return tokenizer


def digits_of(x: Tensor, n: int) -> Tensor:
    """(N,) ints -> (N, n) digits, most significant first."""
    powers = 10 ** torch.arange(n - 1, -1, -1, dtype=torch.long)
    return (x[:, None] // powers) % 10


def thought_chain(a: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(N,) operands -> thought (N, n), least significant digit first, and answer (N, n+1), MSB first."""
    da, db = digits_of(a, n).flip(1), digits_of(b, n).flip(1)  # least significant first
    carry = torch.zeros_like(a)
    thought = []
    for i in range(n):
        total = da[:, i] + db[:, i] + carry
        carry = total // 10
        thought.append(torch.where(carry > 0, CARRY_BASE + total % 10, total % 10))
    return torch.stack(thought, 1), digits_of(a + b, n + 1)


def prompt_ids(a: Tensor, b: Tensor, n: int) -> Tensor:
    """(N, 2n+2): the digits of a (least significant first), +, the digits of b, =."""
    N = len(a)
    return torch.cat([digits_of(a, n).flip(1), torch.full((N, 1), PLUS), digits_of(b, n).flip(1),
                      torch.full((N, 1), EQUALS)], 1)


def format_problem(a: int, b: int, n: int) -> str:
    """The prompt text: operands written least significant digit first."""
    return f"{a:0{n}d}"[::-1] + "+" + f"{b:0{n}d}"[::-1] + "="


def answer_text(a: int, b: int, n: int) -> str:
    return f"{a + b:0{n + 1}d}"


@dataclass(kw_only=True)
class AdditionTask(Task):
    n_digits: int
    train_pairs: Tensor  # (N, 2) operands
    valid_pairs: Tensor
    test_pairs: Tensor
    truncate_fraction: float = 0.5
    discard_fraction: float = 0.5

    @property
    def thought_len(self) -> int:
        return self.n_digits

    @property
    def prompt_len(self) -> int:
        return 2 * self.n_digits + 2

    def sequences(self, pairs: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Full sequences with the thought cut to keep[i] tokens (right-padded), and the loss mask
        over next-token targets (B, T-1): the output, without forced `</think>`s or padding."""
        n, L, P = self.n_digits, self.thought_len, self.prompt_len
        a, b = pairs[:, 0], pairs[:, 1]
        thought, answer = thought_chain(a, b, n)
        B = len(pairs)
        col = lambda t: torch.full((B, 1), t)  # noqa: E731
        full = torch.cat([prompt_ids(a, b, n), col(THINK), thought, col(END_THINK), answer, col(EOS)], 1)
        T = full.shape[1]
        j = torch.arange(T)[None].expand(B, T)
        src = torch.where(j < P + 1 + keep[:, None], j, j + (L - keep[:, None]))  # skip the cut thought tokens
        valid = src < T
        seqs = torch.where(valid, full.gather(1, src.clamp_max(T - 1)), torch.full_like(full, PAD))
        loss = valid[:, 1:] & (j[:, 1:] >= P)  # targets from <think> on
        forced_end = (j[:, 1:] == P + 1 + keep[:, None]) & (keep[:, None] < L)
        return seqs, loss & ~forced_end

    def _batch(self, pairs: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        seqs, loss = self.sequences(pairs, keep)
        targets = seqs[:, 1:].masked_fill(~loss, IGNORE)
        return seqs[:, :-1], targets

    def train_batch(self, batch_size: int, generator: torch.Generator, progress: float = 1.0) -> tuple[Tensor, Tensor]:
        rows = torch.randint(len(self.train_pairs), (batch_size,), generator=generator)
        cut = torch.rand(batch_size, generator=generator) < self.truncate_fraction
        k = torch.randint(0, self.thought_len, (batch_size,), generator=generator)
        k = torch.where(torch.rand(batch_size, generator=generator) < 1 / 3, 0, k)
        keep = torch.where(cut, k, self.thought_len)
        return self._batch(self.train_pairs[rows], keep)

    def train_mask(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        discard = torch.rand(len(ids), generator=generator) < self.discard_fraction
        return thought_attention_mask(ids, THINK, END_THINK, discard)

    def batches(self, split: str, batch_size: int, max_tokens: int | None = None):
        pairs = self.test_pairs if split == "test" else self.valid_pairs
        if max_tokens is not None:
            pairs = pairs[: max(1, max_tokens // self.seq_len)]
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            yield self._batch(chunk, torch.full((len(chunk),), self.thought_len))


def addition_task(n_digits: int = 6, train_size: int = 200_000, test_size: int = 2000, seed: int = 0,
                  truncate_fraction: float = 0.5, discard_fraction: float = 0.5) -> AdditionTask:
    """n-digit addition with supervised thought chains; `test_size` problems each are held out for
    validation and test, and never appear in training."""
    if not 1 <= n_digits <= 9:
        raise ValueError(f"n_digits={n_digits} must be in [1, 9]")
    gen = torch.Generator().manual_seed(seed)
    hi = 10**n_digits
    pairs = torch.randint(0, hi, (train_size + 2 * test_size, 2), generator=gen)
    keys = pairs[:, 0] * hi + pairs[:, 1]
    valid, test = pairs[train_size : train_size + test_size], pairs[train_size + test_size :]
    train = pairs[:train_size][~torch.isin(keys[:train_size], keys[train_size:])]
    seq_len = 4 * n_digits + 5  # ids per full example: prompt 2n+2, thought n+2, answer n+1, eos; minus one
    return AdditionTask(
        name="addition", tokenizer=addition_tokenizer(), seq_len=seq_len, train=train, valid=test, test=test,
        answer_only=False, n_digits=n_digits, train_pairs=train, valid_pairs=valid, test_pairs=test,
        truncate_fraction=truncate_fraction, discard_fraction=discard_fraction,
        special_ids={"eos_id": EOS, "pad_id": PAD, "think_start_id": THINK, "think_end_id": END_THINK},
        config_fields={"thought_kv": ["keep", "discard"] if discard_fraction > 0 else ["keep"],
                       "default_thought_tokens": n_digits},
    )
