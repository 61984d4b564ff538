"""Tokens -> the text pieces a stream sends, decoding a few recent tokens per step, never the whole completion.

A token's text can depend on its neighbours (a SentencePiece decoder drops the first token's leading space; a
byte-level or byte-fallback token may carry part of a multi-byte character), so a new token's text is read as
the difference between two decodes of a short window: ``decode(tokens[start:])`` less ``decode(tokens[start:
read])``, where ``read`` is where the text sent so far ends and ``start`` the boundary before it.  The window
only moves to a boundary where the decoded text is whole (it does not end in U+FFFD, a character whose bytes
have not all arrived), so the pieces join into exactly ``tokenizer.decode(all tokens)`` for any valid UTF-8
text.  Two decodes of a handful of tokens per token: the work per token does not grow with the completion.

Past ``HOLD`` tokens that still end in U+FFFD (a model emitting bytes that form no character: no whole
character is that long) the window moves on anyway and sends its U+FFFD; only there can the joined text differ
from a whole decode, where the next byte would have completed a character.
"""

from __future__ import annotations

from typing import Any

#: undecided tokens held at most (a UTF-8 character has at most 4 bytes, a token at least one)
HOLD = 8
REPLACEMENT = "\ufffd"


class TextStream:
    """Tokens -> pieces safe to send: a piece never ends inside a stop sequence that may still complete, nor
    inside a character whose bytes have not all arrived (see the module docstring)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.window: list[int] = []  # the tokens from ``start``: the boundary before the text sent last
        self.read = 0  # in ``window``: where the decoded text so far ends
        self.prefix = ""  # decode(window[:read])
        self.pending = ""  # decoded text not yet sent: held back while it may begin a stop sequence

    def add(self, token: int) -> tuple[str, bool]:
        """The piece ``token`` releases, and whether a stop sequence ended the text (the stop itself is cut)."""
        self.window.append(token)
        text = self._decode(self.window)
        if text.endswith(REPLACEMENT) and len(self.window) - self.read < HOLD:
            return "", False  # a character not yet whole: wait for its next byte
        self._advance(text)
        return self._release(final=False)

    def rest(self) -> tuple[str, bool]:
        """What was held back, once no token follows (and whether a stop sequence ended it)."""
        if self.read < len(self.window):
            self._advance(self._decode(self.window))
        return self._release(final=True)

    def _advance(self, text: str) -> None:
        """The window's new text joins ``pending``; the window starts again at the old read point."""
        self.pending += text[len(self.prefix):]
        self.window = self.window[self.read:]
        self.read = len(self.window)
        self.prefix = self._decode(self.window)

    def _release(self, final: bool) -> tuple[str, bool]:
        found = [at for at in (self.pending.find(s) for s in self.stop) if at >= 0]
        if found:
            piece, self.pending = self.pending[:min(found)], ""
            return piece, True
        held = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])),
                                   default=0)
        end = len(self.pending) - held
        piece, self.pending = self.pending[:end], self.pending[end:]
        return piece, False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
