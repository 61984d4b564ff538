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


OTHER_ENCODING = "pass another --encoding (e.g. cp1252, latin-1), or auto to detect it"
#: JSON files (task files) are UTF-8 by definition: the fix is in the file, not in an option
SAVE_AS_UTF8 = "save it as UTF-8 (JSON files are UTF-8)"


def _strict_decode(raw: bytes, codec: str, path: Path, skipped: int = 0, remedy: str = OTHER_ENCODING) -> str:
    """``raw`` decoded with ``codec``, never dropping or replacing a byte; a failure names the offset
    in the file (``skipped``: bytes of a byte-order mark before ``raw``) and ``remedy``."""
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        offset = skipped + exc.start
        bad = " ".join(f"0x{byte:02x}" for byte in raw[exc.start : min(exc.end, exc.start + 4)])
        shown = "UTF-8" if codec == UTF8 else codec
        raise DataError(f"{path} is not {shown} text: {bad} at byte offset {offset} ({exc.reason}); {remedy}") from None
    except (UnicodeError, ValueError, LookupError) as exc:  # codecs that fail otherwise (undefined, idna, ...)
        raise DataError(f"{path} cannot be read as {codec} ({exc}); {remedy}") from None


def _without_nul(decoded: DecodedText, raw: bytes, path: Path, remedy: str | None = None) -> DecodedText:
    """``decoded``, unless it is full of NUL characters: UTF-16 text without a byte-order mark is valid
    UTF-8 (every other byte NUL), and training on it teaches the model nothing but NULs."""
    nul = decoded.text.count("\x00")
    if nul == 0 or nul * 10 < len(decoded.text):
        return decoded
    little = raw[1::2].count(0) >= raw[0::2].count(0)  # ASCII in UTF-16-LE: the NUL is the second byte
    remedy = remedy or f"pass --encoding utf-16-{'le' if little else 'be'}"
    raise DataError(
        f"{path} read as {decoded.encoding} is {nul / len(decoded.text):.0%} NUL characters: is it UTF-16 without "
        f"a byte-order mark? {remedy}"
    )


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
    raw = _read(path)
    return _without_nul(_decode(raw, path, encoding), raw, path)


def decode_json_text(path: Path) -> tuple[str, bytes]:
    """(text, bytes) of a JSON / JSONL file: UTF-8 as JSON requires, a leading byte-order mark skipped as
    in data files (editors on Windows write one), refused when full of NUL characters (UTF-16)."""
    raw = _read(path)
    skipped = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    text = _strict_decode(raw[skipped:], UTF8, path, skipped, SAVE_AS_UTF8)
    return _without_nul(DecodedText(text, UTF8, "given"), raw, path, SAVE_AS_UTF8).text, raw


def _read(path: Path) -> bytes:
    """The file's bytes; a folder, a device or a pipe (which could block or never end) is refused."""
    if not path.is_file():
        raise DataError(f"{path} is not a regular file; give a text file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _decode(raw: bytes, path: Path, encoding: str) -> DecodedText:
    if encoding != AUTO_ENCODING:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise DataError(f"{path}: {encoding!r} is not an encoding Python knows; pass another --encoding") from None
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
        except (UnicodeError, LookupError):
            continue  # a large file is judged on samples: the next candidate may read all of it
    raise DataError(
        f"{path} is not UTF-8 and its encoding cannot be detected (is it text?); "
        "pass --encoding, e.g. --encoding cp1252 or --encoding latin-1"
    )
