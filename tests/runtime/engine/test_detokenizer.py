"""Incremental detokenization gives the text a full decode gives, at every length."""

import random

from tokenizers import Tokenizer

from runtime.checkpoint import DEFAULT_MODEL
from runtime.engine.detokenizer import IncrementalDetokenizer


def load_tokenizer(path):
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_incremental_text_equals_full_decode_for_random_tokens():
    tok = load_tokenizer(DEFAULT_MODEL)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(tok)
        for n, t in enumerate(ids, 1):
            detok.append(t)
            full = tok.decode(ids[:n])
            assert full.startswith(detok.text)  # what was emitted never changes
            assert detok.final_text() == full


def test_an_incomplete_character_is_held_back_until_completed():
    tok = load_tokenizer(DEFAULT_MODEL)
    ids = tok.encode("tea \u00e9t\u00e9 \u2603 done").ids
    detok = IncrementalDetokenizer(tok)
    seen = []
    for t in ids:
        detok.append(t)
        seen.append(detok.text)
        assert "\ufffd" not in detok.text
    assert detok.final_text() == tok.decode(ids)
    assert seen == sorted(seen, key=len)  # text only grows


def test_engine_text_is_the_decode_of_its_tokens():
    from runtime.engine.llm import LLM
    from runtime.engine.params import SamplingParams

    llm = LLM(DEFAULT_MODEL, device="cpu")
    outs = llm.generate(["It is a truth", "Anne"], SamplingParams(max_tokens=80, temperature=1.3, seed=3, ignore_eos=True))
    for completion in outs:
        for seq in completion.outputs:
            assert seq.text == llm.tokenizer.decode(seq.token_ids)
