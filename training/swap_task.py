"""The shell game: track five cups through a sequence of swaps. A serial task whose thought
ends in a one-token summary, so it survives thought KV 'discard'.

    prompt:  s_1 s_2 .. s_L =               (each s_i one token: the two cup positions it swaps, "12".."45")
    output:  <think> t_1 t_2 .. t_L </think> x_1 x_2 x_3 x_4 x_5 <eos>

Cups 1..5 start holding items A..E in order. The answer is the arrangement after all L swaps, the
item in cup 1 first ("CAEBD"). The supervised thought is the arrangement after each swap, one token
per swap out of the 120 arrangements (written lowercase, "bacde "). Each thought token reads its
swap at a fixed distance and the arrangement from the token before it: one lookup in a 120 x 10
table per step. Answering directly means composing L permutations of S5 at once (the word problem
of a non-solvable group; no fixed-depth shortcut is known), so a small model cannot.

Why this task serves thought KV 'discard' where addition did not: the last thought token is the
whole state the answer needs, and `</think>` (the one position of the span whose KV is kept) sits
right after it. One attention step copies it into `</think>`; every answer letter then reads
`</think>` and the letter before it. The addition answer needed every thought token (a digit each),
more than one position of a 2-layer model could carry.

Training mixes thought lengths and KV modes as addition does (training/thought_tasks.py). Problems
are drawn fresh for every batch; the held-out ones are drawn first from their own seed and are
never trained on (a training draw that hits one is drawn again).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders
from torch import Tensor

from training.tasks import symbol_tokenizer
from training.thought_tasks import ThoughtTask, trained_modes

N_CUPS = 5
SWAPS = list(itertools.combinations(range(N_CUPS), 2))  # swap token id -> the two cups (0-based)
ARRANGEMENTS = list(itertools.permutations(range(N_CUPS)))  # state token id - STATE_BASE -> items by cup
ITEMS = "ABCDE"
SYMBOLS = ([f"{p + 1}{q + 1}" for p, q in SWAPS] + ["=", "<think>", "</think>", "<eos>", "<pad>"] + list(ITEMS)
           + ["".join(ITEMS[i].lower() for i in a) + " " for a in ARRANGEMENTS])
EQUALS, THINK, END_THINK, EOS, PAD = range(len(SWAPS), len(SWAPS) + 5)
ITEM_BASE = PAD + 1  # token id of item A
STATE_BASE = ITEM_BASE + N_CUPS  # token id of the arrangement ARRANGEMENTS[0] (abcde)
_CODE = torch.tensor([N_CUPS**i for i in range(N_CUPS)])
_STATE_OF_CODE = torch.full((N_CUPS**N_CUPS,), -1, dtype=torch.long)
_STATE_OF_CODE[(torch.tensor(ARRANGEMENTS) * _CODE).sum(1)] = torch.arange(len(ARRANGEMENTS))


def swap_tokenizer() -> Tokenizer:
    tokenizer = symbol_tokenizer(SYMBOLS)
    tokenizer.decoder = decoders.Fuse()  # "1245=" decodes without spaces
    return tokenizer


def play(swaps: Tensor) -> Tensor:
    """(N, L) swap ids -> (N, L, 5): the item in each cup after each swap."""
    N, L = swaps.shape
    cups = torch.arange(N_CUPS).expand(N, N_CUPS).clone()
    pairs = torch.tensor(SWAPS)[swaps]  # (N, L, 2)
    rows = torch.arange(N)
    states = []
    for i in range(L):
        p, q = pairs[:, i, 0], pairs[:, i, 1]
        held_p = cups[rows, p].clone()
        cups[rows, p] = cups[rows, q]
        cups[rows, q] = held_p
        states.append(cups.clone())
    return torch.stack(states, 1)


def state_ids(arrangements: Tensor) -> Tensor:
    """(..., 5) items by cup -> (...) state token ids."""
    return STATE_BASE + _STATE_OF_CODE[(arrangements * _CODE).sum(-1)]


def format_swaps(swaps: list[int]) -> str:
    return "".join(SYMBOLS[s] for s in swaps) + "="


def final_arrangement(swaps: list[int]) -> str:
    return "".join(ITEMS[i] for i in play(torch.tensor([swaps]))[0, -1].tolist())


def _keys(swaps: Tensor) -> Tensor:
    """(N, L) -> (N,) an integer per sequence (L <= 18 keeps it in int64)."""
    return (swaps * len(SWAPS) ** torch.arange(swaps.shape[1])).sum(1)


@dataclass(kw_only=True)
class SwapTask(ThoughtTask):
    n_swaps: int
    seed: int = 0
    _held_keys: Tensor | None = None

    def __post_init__(self) -> None:
        self._held_keys = _keys(torch.cat([self.valid_problems, self.test_problems]))

    def parts(self, problems: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        N = len(problems)
        states = play(problems)
        prompt = torch.cat([problems, torch.full((N, 1), EQUALS)], 1)
        return prompt, state_ids(states), ITEM_BASE + states[:, -1]

    def format_problem(self, problem: list[int]) -> str:
        return format_swaps(problem)

    def answer_text(self, problem: list[int]) -> str:
        return final_arrangement(problem)

    def sample_train(self, batch_size: int, generator: torch.Generator) -> Tensor:
        swaps = torch.randint(len(SWAPS), (batch_size, self.n_swaps), generator=generator)
        while True:  # held out: never trained on
            clash = torch.isin(_keys(swaps), self._held_keys)
            if not clash.any():
                return swaps
            swaps[clash] = torch.randint(len(SWAPS), (int(clash.sum()), self.n_swaps), generator=generator)


def swap_task(n_swaps: int = 12, test_size: int = 2000, seed: int = 0, truncate_fraction: float = 0.5,
              zero_fraction: float = 1 / 3, discard_fraction: float = 0.5) -> SwapTask:
    """The shell game with `n_swaps` swaps; `test_size` problems each for validation and test."""
    if not 1 <= n_swaps <= 18:
        raise ValueError(f"n_swaps={n_swaps} must be in [1, 18]")
    if len(SWAPS) ** n_swaps < 8 * test_size:
        raise ValueError(f"n_swaps={n_swaps} has only {len(SWAPS) ** n_swaps} problems, too few to hold out "
                         f"2 x test_size={test_size}; use more swaps or a smaller test_size")
    gen = torch.Generator().manual_seed(10_007 + seed)  # the held-out draw, apart from training's
    held = torch.randint(len(SWAPS), (4 * test_size, n_swaps), generator=gen)
    seen: set[int] = set()
    distinct = []  # the first draw of each problem
    for i, k in enumerate(_keys(held).tolist()):
        if k not in seen:
            seen.add(k)
            distinct.append(i)
    held = held[distinct][: 2 * test_size]
    valid, test = held[:test_size], held[test_size:]
    empty = torch.zeros(0, n_swaps, dtype=torch.long)
    seq_len = 2 * n_swaps + 8  # ids per full example: prompt L+1, thought L+2, answer 5, eos; minus one
    return SwapTask(
        name="swaps", tokenizer=swap_tokenizer(), seq_len=seq_len, train=empty, valid=valid, test=test,
        answer_only=False, n_swaps=n_swaps, seed=seed, train_problems=empty, valid_problems=valid,
        test_problems=test, thought_len=n_swaps, prompt_len=n_swaps + 1, truncate_fraction=truncate_fraction,
        zero_fraction=zero_fraction, discard_fraction=discard_fraction,
        special_ids={"eos_id": EOS, "pad_id": PAD, "think_start_id": THINK, "think_end_id": END_THINK},
        config_fields={"thought_kv": trained_modes(discard_fraction), "default_thought_tokens": n_swaps},
    )
