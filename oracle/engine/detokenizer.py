"""Incremental text from generated tokens, with stop sequences matched across token boundaries.

Text is released only when it is final: never half a UTF-8 character, and never the start of
what may turn out to be a stop sequence (so a stop string can't leak into a stream)."""

from __future__ import annotations

from shard_common.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.released = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode_new(self) -> str:
        # Decode a short window ending at the new tokens, so that tokenizers which merge spaces
        # across tokens still produce the right characters, without re-decoding everything.
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
        full = self.tokenizer.decode(self.ids[self._prefix_offset:])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return full[len(prefix):]

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final. After a stop match, ``stopped`` is set
        and the returned text ends right before the stop sequence."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        search_from = max(0, self.released - max((len(s) for s in self.stop), default=0))
        self.text += self._decode_new()
        if self.stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released:upto]
        self.released = upto
        return out

    def flush(self) -> str:
        """At the end of generation: whatever was held back is final now."""
        if not self.stopped:
            tail = self.tokenizer.decode(self.ids[self._prefix_offset:])
            prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
            self.text += tail[len(prefix):]
            self._prefix_offset = self._read_offset = len(self.ids)
        return self._release(len(self.text))
