"""Tests for the Jane Austen corpus and the BPE tokenizer trainer."""

import pytest

from training.data import austen
from training.data.austen import (
    BOOKS,
    HELDOUT,
    SPECIAL_TOKENS,
    heldout_text,
    load_book,
    train_bpe_tokenizer,
    train_text,
)

PERSUASION_OPENING = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire"


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_bpe_tokenizer(train_text()[:200_000], vocab_size=512)


@pytest.mark.parametrize("name", BOOKS)
def test_books_load(name: str) -> None:
    text = load_book(name)
    assert len(text) > 100_000
    assert "\r" not in text


def test_unknown_book() -> None:
    with pytest.raises(KeyError):
        load_book("lady_susan")


def test_missing_files_point_to_build_script(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(austen, "AUSTEN_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/build_austen_corpus.py"):
        load_book("emma")


def test_heldout_is_persuasion_and_not_in_train() -> None:
    assert HELDOUT == "persuasion"
    train, heldout = train_text(), heldout_text()
    assert PERSUASION_OPENING in heldout
    assert PERSUASION_OPENING not in train
    assert "It is a truth universally acknowledged" in train
    assert len(train) > 5 * 100_000


def test_special_token_ids(small_tokenizer) -> None:
    assert [small_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|pad|>", "<think>", "</think>")
    assert small_tokenizer.get_vocab_size() == 512


def test_round_trip(small_tokenizer) -> None:
    heldout = heldout_text()
    start = heldout.index(PERSUASION_OPENING)
    paragraph = heldout[start : heldout.index("\n\n", start)]
    assert len(paragraph) > 500
    for text in (paragraph, "  Odd   spacing,\ttabs\n\n\nand £20,000 — naïve café ✓ "):
        ids = small_tokenizer.encode(text).ids
        assert small_tokenizer.decode(ids) == text
    assert len(small_tokenizer.encode(paragraph).ids) < len(paragraph.encode("utf-8"))


def test_special_tokens_encode_atomically(small_tokenizer) -> None:
    ids = small_tokenizer.encode("<think>hmm</think><|endoftext|>").ids
    assert ids[0] == 2 and 3 in ids and ids[-1] == 0


def test_deterministic() -> None:
    text = train_text()[:50_000]
    a = train_bpe_tokenizer(text, vocab_size=400)
    b = train_bpe_tokenizer(text, vocab_size=400)
    assert a.to_str() == b.to_str()
