"""Incremental detokenization: the text of a growing token list at O(1) decode work per token.

Decoding the whole list after every token costs O(n) per token, O(n^2) per request. Like vLLM,
this decodes a short window instead: the new text is decode(ids[prefix:]) minus decode(ids[prefix:read]),
where [prefix, read) is the last emitted chunk, kept as context so that tokenizers which drop a
leading space at the start of a decode still place it. Text ending in an incomplete UTF-8 sequence
("\ufffd") is held back until the next token completes it, or until `final_text`.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # decoded and complete so far
        self._prefix = self._read = 0
        self._done = 0  # len(decode(ids[prefix:read])): the window's text already emitted

    def append(self, token_id: int) -> None:
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self._prefix :])
        if len(window) > self._done and not window.endswith("\ufffd"):
            self.text += window[self._done :]
            self._prefix, self._read = self._read, len(self.ids)
            self._done = len(self.tokenizer.decode(self.ids[self._prefix : self._read]))

    def final_text(self) -> str:
        """The text including any held-back tail, as a full decode of the last chunk gives it."""
        if self._read == len(self.ids):
            return self.text
        return self.text + self.tokenizer.decode(self.ids[self._prefix :])[self._done :]
