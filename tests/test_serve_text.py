"""``losa serve``'s streamed text (``TextStream``): the pieces join into exactly the whole decode, and the
work per token stays the same however long the completion grows.

Two tokenizers, both built here from nothing: the tests' byte-level BPE (``conftest.tiny_tokenizer``: a
character outside its merges is split into byte tokens) and a SentencePiece-style one with byte fallback
(``<0xE4>``-like tokens, a ``▁`` for the space, the first space stripped on decode), as Llama's is.
"""

from __future__ import annotations

import pytest

from conftest import tiny_tokenizer
from losa_cli.runtime.serve.text import HOLD, TextStream

#: multi-byte characters of every length (2: é, 3: 中 and €, 4: the emoji), next to ASCII and each other
TEXTS = ["the river and the mountain", "naïve café — 中文 €5 😀🚀 ok", "日本語のテキスト", "🙂", " a  b ü"]


def byte_fallback_tokenizer():
    """Single characters (ASCII letters, digits, punctuation, ``▁``) and the 256 byte tokens: everything
    else falls back to its UTF-8 bytes, one token each."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?-'":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def tokenizer(request):
    return tiny_tokenizer(add_bos=False) if request.param == "byte-level" else byte_fallback_tokenizer()


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """The pieces ``TextStream`` sends for ``ids`` one at a time, as the worker does, and whether a stop ended it."""
    text, pieces = TextStream(tokenizer, stop), []
    for token in ids:
        piece, stopped = text.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    piece, stopped = text.rest()
    return pieces + [piece], stopped


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_into_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in whole
    if any(ord(ch) > 127 for ch in text):  # the case that matters: a character split over byte tokens
        assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
    pieces, _ = stream(tokenizer, ids + [tokenizer.eos_token_id])
    assert "".join(pieces) == whole
    assert not any("\ufffd" in piece for piece in pieces)  # a character is sent once whole, never in parts


def test_every_prefix_of_the_stream_is_exact(tokenizer):
    """Cut at any token (max_tokens), the pieces and the held-back rest still join into that prefix's decode.

    Byte fallback decodes a run of byte tokens together, so a run cut inside a character decodes every byte
    of the run as U+FFFD, characters already sent included: only cuts at a whole character are comparable there
    (byte-level BPE replaces only the incomplete bytes, so every cut is)."""
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    for end in range(1, len(ids) + 1):
        whole = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if "\ufffd" in whole and "<0x80>" in tokenizer.get_vocab():
            continue
        assert "".join(stream(tokenizer, ids[:end])[0]) == whole


def test_stop_sequences_cut_across_pieces(tokenizer):
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids)
    for stop in ("中文", "é — ", "😀🚀", "ok"):
        pieces, stopped = stream(tokenizer, ids, (stop, "never there"))
        assert stopped and "".join(pieces) == whole[:whole.index(stop)]
    pieces, stopped = stream(tokenizer, ids, ("never there",))
    assert not stopped and "".join(pieces) == whole


def test_the_work_per_token_does_not_grow_with_the_completion(tokenizer):
    """The tokens handed to ``decode`` per new token stay bounded: a decode of the whole completion at every
    token (quadratic in its length) fails this."""
    ids = tokenizer(" ".join(TEXTS) * 12, add_special_tokens=False)["input_ids"]
    assert len(ids) > 400
    decoded: list[int] = []

    class Counting:
        def decode(self, tokens, **kw):
            decoded.append(len(tokens))
            return tokenizer.decode(tokens, **kw)

    pieces, _ = stream(Counting(), ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert max(decoded) <= 2 * HOLD
    assert sum(decoded) <= 8 * len(ids)


def test_bytes_that_never_form_a_character_are_sent_after_a_bounded_wait():
    """A run of continuation bytes (no character ever completes) is held at most ``HOLD`` tokens, then sent."""
    tokenizer = byte_fallback_tokenizer()
    continuation = tokenizer.convert_tokens_to_ids("<0x80>")
    text = TextStream(tokenizer, ())
    sent = "".join(text.add(continuation)[0] for _ in range(3 * HOLD))
    assert sent and set(sent) == {"\ufffd"} and len(text.window) <= 2 * HOLD
