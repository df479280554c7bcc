"""Tasks with supervised thought chains (`ThoughtTask`), and multi-digit addition, the first of them.

    prompt:  a_0 a_1 .. a_{n-1} + b_0 .. b_{n-1} =       (operands least significant digit first)
    output:  <think> t_0 t_1 .. t_{n-1} </think> c_n s_{n-1} .. s_0 <eos>

The answer is written most significant digit first (n+1 digits), so its first digit already
depends on the whole carry chain: hard to get right directly for a small model. The supervised
thought works the sum out least significant digit first, one token per digit: t_i is the digit
s_i = (a_i + b_i + c_i) mod 10, written as 0-9 when no carry goes out of it and as a-j (for 0-9)
when one does. Each thought token reads its operand digits at a fixed distance and the carry from
the token before it; after the thought every answer digit is a copy.

Training mixes three things, so that one checkpoint serves every thought budget and both KV modes:
- a `truncate_fraction` of examples has the thought cut at a random length k < n (k = 0, the
  forced immediate answer, a `zero_fraction` of the time); no loss on the forced `</think>`;
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


def trained_modes(discard_fraction: float) -> list[str]:
    """The thought KV modes a model trained with this share of 'discard' examples serves, preferred first."""
    if not 0.0 <= discard_fraction <= 1.0:
        raise ValueError(f"discard_fraction={discard_fraction} must be in [0, 1]")
    return [m for m, used in (("keep", discard_fraction < 1), ("discard", discard_fraction > 0)) if used]


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
class ThoughtTask(Task):
    """A task whose examples are `prompt <think> thought </think> answer <eos>`, built from problems
    (one row of ints per problem) by `parts`. Training cuts thoughts and picks the thought KV mode
    per example (see the module docstring of each task); held-out problems are answered in full."""

    train_problems: Tensor  # (N, ...) problems, one per row
    valid_problems: Tensor
    test_problems: Tensor
    thought_len: int  # thought tokens of a full chain
    prompt_len: int
    truncate_fraction: float = 0.5  # examples whose thought is cut at a random length k < thought_len
    zero_fraction: float = 1 / 3  # of the cut examples, those cut at k = 0 (the forced immediate answer)
    discard_fraction: float = 0.5  # examples trained with the thought KV 'discard' mask

    def parts(self, problems: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, ...) problems -> prompt (N, P), thought (N, thought_len), answer (N, A) ids."""
        raise NotImplementedError

    def format_problem(self, problem: list[int]) -> str:
        """One problem row -> the prompt text."""
        raise NotImplementedError

    def answer_text(self, problem: list[int]) -> str:
        raise NotImplementedError

    def sample_train(self, batch_size: int, generator: torch.Generator) -> Tensor:
        rows = torch.randint(len(self.train_problems), (batch_size,), generator=generator)
        return self.train_problems[rows]

    def sequences(self, problems: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Full sequences with the thought cut to keep[i] tokens (right-padded), and the loss mask
        over next-token targets (B, T-1): the output, without forced `</think>`s or padding."""
        ids = self.special_ids
        think, end_think, eos, pad = ids["think_start_id"], ids["think_end_id"], ids["eos_id"], ids["pad_id"]
        prompt, thought, answer = self.parts(problems)
        P, L = prompt.shape[1], thought.shape[1]
        B = len(problems)
        col = lambda t: torch.full((B, 1), t)  # noqa: E731
        full = torch.cat([prompt, col(think), thought, col(end_think), answer, col(eos)], 1)
        T = full.shape[1]
        j = torch.arange(T)[None].expand(B, T)
        src = torch.where(j < P + 1 + keep[:, None], j, j + (L - keep[:, None]))  # skip the cut thought tokens
        valid = src < T
        seqs = torch.where(valid, full.gather(1, src.clamp_max(T - 1)), torch.full_like(full, pad))
        loss = valid[:, 1:] & (j[:, 1:] >= P)  # targets from <think> on
        forced_end = (j[:, 1:] == P + 1 + keep[:, None]) & (keep[:, None] < L)
        return seqs, loss & ~forced_end

    def _batch(self, problems: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        seqs, loss = self.sequences(problems, keep)
        targets = seqs[:, 1:].masked_fill(~loss, IGNORE)
        return seqs[:, :-1], targets

    def train_batch(self, batch_size: int, generator: torch.Generator, progress: float = 1.0) -> tuple[Tensor, Tensor]:
        problems = self.sample_train(batch_size, generator)
        cut = torch.rand(batch_size, generator=generator) < self.truncate_fraction
        k = torch.randint(0, self.thought_len, (batch_size,), generator=generator)
        k = torch.where(torch.rand(batch_size, generator=generator) < self.zero_fraction, 0, k)
        keep = torch.where(cut, k, self.thought_len)
        return self._batch(problems, keep)

    def train_mask(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        discard = torch.rand(len(ids), generator=generator) < self.discard_fraction
        special = self.special_ids
        return thought_attention_mask(ids, special["think_start_id"], special["think_end_id"], discard)

    def batches(self, split: str, batch_size: int, max_tokens: int | None = None):
        problems = self.test_problems if split == "test" else self.valid_problems
        if max_tokens is not None:
            problems = problems[: max(1, max_tokens // self.seq_len)]
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            yield self._batch(chunk, torch.full((len(chunk),), self.thought_len))


@dataclass(kw_only=True)
class AdditionTask(ThoughtTask):
    n_digits: int

    def parts(self, problems: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, b, n = problems[:, 0], problems[:, 1], self.n_digits
        thought, answer = thought_chain(a, b, n)
        return prompt_ids(a, b, n), thought, answer

    def format_problem(self, problem: list[int]) -> str:
        return format_problem(problem[0], problem[1], self.n_digits)

    def answer_text(self, problem: list[int]) -> str:
        return answer_text(problem[0], problem[1], self.n_digits)


def addition_task(n_digits: int = 6, train_size: int = 200_000, test_size: int = 2000, seed: int = 0,
                  truncate_fraction: float = 0.5, zero_fraction: float = 1 / 3,
                  discard_fraction: float = 0.5) -> AdditionTask:
    """n-digit addition with supervised thought chains; `test_size` problems each are held out for
    validation and test, and never appear in training. The split depends on `train_size`: build the
    task with the training run's `train_size` to get that run's held-out problems."""
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
        answer_only=False, n_digits=n_digits, train_problems=train, valid_problems=valid, test_problems=test,
        thought_len=n_digits, prompt_len=2 * n_digits + 2, truncate_fraction=truncate_fraction,
        zero_fraction=zero_fraction, discard_fraction=discard_fraction,
        special_ids={"eos_id": EOS, "pad_id": PAD, "think_start_id": THINK, "think_end_id": END_THINK},
        config_fields={"thought_kv": trained_modes(discard_fraction), "default_thought_tokens": n_digits},
    )


THOUGHT_LENGTH_OPTION = {"addition": "n_digits", "swaps": "n_swaps"}  # task -> its factory's thought-length argument


def thought_task_for(cfg, checkpoint: object = "the checkpoint") -> ThoughtTask:
    """The thought task a checkpoint was trained on (its config notes), with that run's held-out problems."""
    from training.tasks import make_task  # it imports this module

    name = cfg.notes.get("task")
    if cfg.default_thought_tokens is None or name not in THOUGHT_LENGTH_OPTION:
        raise ValueError(f"{checkpoint} was trained on task {name!r} with default_thought_tokens="
                         f"{cfg.default_thought_tokens}; a thought task ({sorted(THOUGHT_LENGTH_OPTION)}) is needed")
    options = dict(cfg.notes.get("train_config", {}).get("task_options", {}))
    options.setdefault(THOUGHT_LENGTH_OPTION[name], cfg.default_thought_tokens)
    return make_task(name, **options)
