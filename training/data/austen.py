"""Jane Austen's six novels as a small text corpus, plus a byte-level BPE trainer.

The text files are produced by ``scripts/build_austen_corpus.py``. *Persuasion* is
held out for evaluation; the other five novels form the training text.
"""

import re
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

AUSTEN_DIR = Path(__file__).parent / "austen"
BOOKS: tuple[str, ...] = (
    "sense_and_sensibility",
    "pride_and_prejudice",
    "mansfield_park",
    "emma",
    "northanger_abbey",
    "persuasion",
)
HELDOUT = "persuasion"

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|pad|>", "<think>", "</think>")

# Split points just before a newline that is followed by a non-space character.
# The byte-level pre-tokenizer always makes such a newline a pre-token of its own,
# so training on the pieces (in parallel) sees exactly the same pre-token counts
# as training on the whole text.
_CHUNK_BOUNDARY = re.compile(r"(?=\n\S)")


def load_book(name: str) -> str:
    """Return the full text of one novel, by file stem (e.g. ``"emma"``)."""
    if name not in BOOKS:
        raise KeyError(f"unknown book {name!r}; expected one of {BOOKS}")
    path = AUSTEN_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; generate the corpus with "
            "`python scripts/build_austen_corpus.py`"
        )
    return path.read_text(encoding="utf-8")


def train_text() -> str:
    """All novels except the held-out one, joined by blank lines."""
    return "\n\n".join(load_book(name) for name in BOOKS if name != HELDOUT)


def heldout_text() -> str:
    """The held-out novel (*Persuasion*)."""
    return load_book(HELDOUT)


def _chunks(text: str) -> Iterator[str]:
    yield from _CHUNK_BOUNDARY.split(text)


def train_bpe_tokenizer(text: str, vocab_size: int = 4096) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer on ``text``.

    Special tokens get ids 0..3 in the order of ``SPECIAL_TOKENS``, followed by
    the 256 byte symbols and then the learned merges. ``decode(encode(s).ids)``
    reproduces any string that does not contain the special tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
    return tokenizer
