"""Text files decoded strictly in a chosen or detected encoding: no character is ever dropped or replaced.

``auto`` reads a byte-order mark, else UTF-8, else the encoding ``charset_normalizer`` detects, and
says so in a warning, so a wrong guess is seen (and fixed with ``--encoding``) rather than trained on.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import AUTO_ENCODING
from .errors import DataError

UTF8 = "utf-8"
WESTERN = "cp1252"  # Windows' Western code page: Latin-1's printable characters, plus € “ ” – in 0x80-0x9F
#: byte-order marks that name their encoding; UTF-32's are checked before UTF-16's, which they start with
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, UTF8),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


@dataclass(frozen=True)
class DecodedText:
    """A text file's content and how its bytes became that text."""

    text: str
    encoding: str  # the Python codec used
    reason: str  # "given" (--encoding), "utf-8", "byte-order mark" or "detected"

    def warning(self, what: str) -> str | None:
        """The line telling the user that ``auto`` read the file as something other than UTF-8, so
        a wrong guess is seen (and fixed with --encoding) rather than silently trained on."""
        if self.reason not in ("byte-order mark", "detected"):
            return None
        return f"{what} is not UTF-8; read it as {self.encoding} ({self.reason}); pass --encoding to choose"


def _strict_decode(raw: bytes, codec: str, path: Path, skipped: int = 0) -> str:
    """``raw`` decoded with ``codec``, never dropping or replacing a byte; a failure names the offset
    in the file (``skipped``: bytes of a byte-order mark before ``raw``)."""
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        offset = skipped + exc.start
        bad = " ".join(f"0x{byte:02x}" for byte in raw[exc.start : min(exc.end, exc.start + 4)])
        raise DataError(
            f"{path} is not {codec} text: {bad} at byte offset {offset} ({exc.reason}); "
            "pass another --encoding (e.g. cp1252, latin-1), or auto to detect it"
        ) from None


def _detected_encodings(raw: bytes) -> Iterator[str]:
    """Codecs that read ``raw`` as plausible text, most likely first (judged by ``charset_normalizer``).

    cp1252 comes first whenever its reading is clean: most non-UTF-8 corpora are Western (it is
    also what browsers assume for unlabelled pages), and on mostly-ASCII text detection alone is
    weak -- it reads the pound sign of English news as cp1250's "Ł" and French as mac_latin2.
    Cyrillic, Greek, CJK, Hebrew and Arabic read messily in cp1252 and keep their detected codec;
    Turkish or Hungarian text may be read as cp1252, which the warning names, so --encoding fixes it.
    """
    from charset_normalizer import from_bytes

    if from_bytes(raw, cp_isolation=[WESTERN]).best() is not None:
        yield WESTERN
    yield from (match.encoding for match in from_bytes(raw))


def decode_text(path: Path, encoding: str = AUTO_ENCODING) -> DecodedText:
    """Read a text file in ``encoding``, or with ``auto``: its byte-order mark (UTF-8/16/32), else UTF-8
    when it decodes strictly, else the detected encoding (``_detected_encodings``).  Corpora come in
    many encodings (a Latin-1 news file with a pound sign is common); every byte is decoded strictly,
    so no character is ever dropped or replaced, and an encoding found by auto is reported (``warning``)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if encoding != AUTO_ENCODING:
        codec = codecs.lookup(encoding).name
        skipped = len(codecs.BOM_UTF8) if codec == UTF8 and raw.startswith(codecs.BOM_UTF8) else 0
        return DecodedText(_strict_decode(raw[skipped:], codec, path, skipped), codec, "given")
    for mark, codec in BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            reason = "utf-8" if codec == UTF8 else "byte-order mark"
            return DecodedText(_strict_decode(raw[len(mark) :], codec, path, len(mark)), codec, reason)
    try:
        return DecodedText(raw.decode(UTF8), UTF8, "utf-8")
    except UnicodeDecodeError:
        pass
    for codec in _detected_encodings(raw):
        try:
            return DecodedText(raw.decode(codec), codec, "detected")
        except UnicodeDecodeError:
            continue  # a large file is judged on samples: the next candidate may read all of it
    raise DataError(
        f"{path} is not UTF-8 and its encoding cannot be detected (is it text?); "
        "pass --encoding, e.g. --encoding cp1252 or --encoding latin-1"
    )
