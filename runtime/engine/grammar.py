"""Structured outputs, the torch-free half: a `StructuredOutputs` spec -> an llguidance grammar, and a
`tokenizers.Tokenizer` -> the token table llguidance masks with.

The Validator compiles every spec once, without the tokenizer (the server process has none of
the core's state), so a bad schema or regex is a 400 naming the field before anything is queued.
The engine core builds a matcher from the grammar text for each request (runtime/engine/
structured_output.py). llguidance computes each step's mask lazily from the grammar and a token
trie, so a new schema costs about a millisecond, not a compile over the vocabulary.

JSON is written compactly as Python's json.dumps writes it (", " and ": ", no other
whitespace): a small model given free whitespace may pad forever, and the object ends with its
closing brace, where the request stops.
"""

from __future__ import annotations

import json

import llguidance
from tokenizers import Tokenizer

from runtime.engine.params import ParamError, StructuredOutputs

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CHOICES = 1024


def compile_grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar (JSON text) of a spec; ParamError names the spec's field at fault."""
    kind = spec.kind()
    param = spec.source or f"structured_outputs.{kind}"
    if kind == "regex" and not (isinstance(spec.regex, str) and spec.regex):
        raise ParamError(param, "must be a non-empty regular expression")
    if kind == "choice" and not (isinstance(spec.choice, list) and 0 < len(spec.choice) <= MAX_CHOICES
                                 and all(isinstance(c, str) and c for c in spec.choice)):
        raise ParamError(param, f"must be 1 to {MAX_CHOICES} non-empty strings")
    if kind == "json":
        try:
            schema = json.loads(spec.json)
        except (TypeError, json.JSONDecodeError) as e:
            raise ParamError(param, f"is not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise ParamError(param, f"must be a JSON schema (an object), got {type(schema).__name__}")
    Matcher = llguidance.LLMatcher
    try:
        if kind == "json":
            grammar = Matcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        elif kind == "json_object":
            grammar = Matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
        elif kind == "regex":
            grammar = Matcher.grammar_from_regex(spec.regex)
        else:
            grammar = Matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    except (TypeError, ValueError) as e:
        raise ParamError(param, f"cannot be compiled: {e}") from e
    error = Matcher.validate_grammar(grammar)
    if error:
        raise ParamError(param, f"cannot be compiled: {error.strip()}")
    return grammar


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: each token's bytes, as the detokenizer shows it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: int | None) -> None:
        n = min(vocab_size, tokenizer.get_vocab_size())
        self.tokens = [tokenizer.decode([i], skip_special_tokens=False).encode() for i in range(n)]
        self.tokens += [b""] * (vocab_size - n)  # rows of the head past the tokenizer: never allowed
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special and i < vocab_size}
        self.eos_token_id = eos_id if eos_id is not None else vocab_size - 1
        self.bos_token_id = None
        self.special_token_ids = sorted(special | ({eos_id} if eos_id is not None else set()))
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def token_table(tokenizer: Tokenizer, vocab_size: int, eos_id: int | None) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (vocab_size: the model's, which may exceed the tokenizer's).
    Byte-level BPE tokenizers are read natively; others (word-level symbol vocabularies) through
    each token's decoded text."""
    try:
        return llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_id)
    except ValueError:  # "can't determine decoder type": not byte-level
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokenizer, vocab_size, eos_id)),
                                      n_vocab=vocab_size)
