"""Decide a file's format by its content, never by its name, and describe what it is not.

torch.load's rule is followed exactly: a zip iff the file starts with ``PK\\x03\\x04``
(a pickle with a zip appended is a pickle to torch). Loader and scanner share it; the scanner
routes by ``sniff_any``, which adds the starts other loaders (numpy.load) read differently.
"""

from __future__ import annotations

import re
import struct
from functools import cache
from pathlib import Path

from sdtool.errors import FileAccessError, UnknownFormat
from sdtool.formats.source import RangeReader
from sdtool.vocab import Format

HEAD = 4096


#: What sniffing says is a ``vocab.Format`` (ZIP, PICKLE and TAR before a reader looks inside).


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (n,) = struct.unpack_from("<Q", head)
    if n < 2 or 8 + n > size:
        return False
    body = head[8:].lstrip(b" ")
    return body[:1] == b"{"


def sniff_bytes(head: bytes, size: int) -> Format:
    """The kind of file whose first bytes are ``head`` and whose size is ``size``."""
    if head[:4] == b"PK\x03\x04":
        return Format.ZIP
    if head[:6] == b"\x93NUMPY":
        return Format.NPY
    if head[:4] == b"GGUF":
        return Format.GGUF
    if head[:2] == b"\x1f\x8b":
        return Format.GZIP
    if head[:3] == b"BZh":
        return Format.BZIP2
    if head[:6] == b"\xfd7zXZ\x00":
        return Format.XZ
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return Format.SEVENZIP
    # safetensors first: a header length of 0x0280 bytes starts the file with 80 02, which
    # is also how a protocol-2 pickle starts; the safetensors test (a length that fits the
    # file, then "{") is the stricter one
    if _looks_like_safetensors(head, size):
        return Format.SAFETENSORS
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return Format.PICKLE
    if (len(head) >= 262 and head[257:262] == b"ustar") or _is_v7_tar(head):
        return Format.TAR
    if len(head) >= 2 and head[0] == 0x78 and head[1] in (0x01, 0x5E, 0x9C, 0xDA):
        return Format.ZLIB
    if (
        head[:1] in (b"(", b"c", b"]", b"}", b"N", b"I", b"S", b"V")
        and b"." in head
        and _proto0(head)
    ):
        return Format.PICKLE
    return next((fmt for prefix, fmt in _PREFIXES if head.startswith(prefix)), Format.UNKNOWN)


#: a zip's end-of-central-directory record (sdtool.formats.zip.EOCD_SIG)
_EOCD = b"PK\x05\x06"


def sniff_any(head: bytes, size: int) -> Format:
    """What any loader could read the bytes as: ``sniff_bytes`` (torch.load's rule), and a zip
    also when they start with an end-of-central-directory record (numpy.load opens that as an
    npz, zipfile finding the real end record; torch.load does not). The scanner routes by it.
    """
    kind = sniff_bytes(head, size)
    return Format.ZIP if kind is Format.UNKNOWN and head[:4] == _EOCD else kind


#: formats no model loader reads but that wrap or hide one (joblib opens the first three by
#: these prefixes alone: its compressor detection): the scanner looks inside, open_model says
#: what they are
_PREFIXES = (
    (b"ZF", Format.JOBLIB_ZFILE),  # joblib's old zlib container: b"ZF" + a 19-byte hex length
    (b"\x5d\x00", Format.LZMA),  # LZMA "alone" (joblib's lzma prefix), any dictionary size
    (b"\x04\x22\x4d\x18", Format.LZ4),  # an lz4 frame
    (b"Rar!\x1a\x07", Format.RAR),
)
#: what describe() says of them
_WHAT = {
    Format.JOBLIB_ZFILE: (
        "it is a joblib compressed container (scikit-learn style), not a model file"
    ),
    Format.LZMA: "it looks like an LZMA-compressed file (decompress it first)",
    Format.LZ4: "it looks like an lz4-compressed file (decompress it first)",
    Format.RAR: "it is a RAR archive (unpack it first)",
}


def _is_v7_tar(head: bytes) -> bool:
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        unsigned = sum(head[:148]) + 8 * 32 + sum(head[156:512])
        return stored == unsigned
    except ValueError:
        return False


def _proto0(head: bytes) -> bool:
    """A protocol 0/1 pickle: text opcodes ending in STOP, e.g. ``(dp0\\n...``."""
    return head.rstrip().endswith(b".") or head[:2] in (b"(d", b"(l", b"(t", b"}q", b"]q", b"(c")


def describe(head: bytes, size: int) -> str:
    """What the first bytes look like, for a "not a model file" message."""
    if size == 0:
        return "the file is empty"
    text = head[:512]
    lowered = text.lower().lstrip()
    if text.startswith(b"version https://git-lfs"):
        return "it is a Git-LFS pointer, not the model (fetch it with `git lfs pull`)"
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in lowered:
        return "it is an HTML page (a login or error page saved instead of the model?)"
    if text[:8] == b"\x89PNG\r\n\x1a\n":
        return "it is a PNG image"
    if text[:3] == b"\xff\xd8\xff":
        return "it is a JPEG image"
    known = _WHAT.get(next((f for p, f in _PREFIXES if text.startswith(p)), Format.UNKNOWN))
    if known:
        return known
    if lowered.startswith((b"{", b"[")):
        return "it looks like JSON text"
    if size >= 8 and len(head) >= 8:
        (n,) = struct.unpack_from("<Q", head)
        if 0 < n < 100_000_000 and 8 + n > size and head[8:9] == b"{":
            return (
                f"it looks like a safetensors file cut short: the header needs {8 + n} bytes "
                f"but the file has {size}"
            )
    try:
        if not _control().search(text.decode("utf-8")):
            return "it is plain text"
    except UnicodeDecodeError:
        pass
    return f"its first bytes are {head[:16].hex(' ')}"


def sniff(path: str | Path | RangeReader) -> tuple[Format, bytes, int]:
    """(kind, first bytes, size) of ``path``; FileAccessError when it cannot be read."""
    if isinstance(path, RangeReader):
        head = path.pread(0, HEAD)
        return sniff_bytes(head, path.size), head, path.size
    p = Path(path)
    try:
        if p.is_dir():
            raise FileAccessError("is a directory, not a model file", path=p)
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(HEAD)
    except FileNotFoundError:
        raise FileAccessError("no such file", path=p) from None
    except PermissionError:
        raise FileAccessError("permission denied", path=p) from None
    except IsADirectoryError:
        raise FileAccessError("is a directory, not a model file", path=p) from None
    except OSError as e:
        raise FileAccessError(f"cannot read: {e.strerror or e}", path=p) from None
    return sniff_bytes(head, size), head, size


def not_a_model(path: Path, head: bytes, size: int) -> UnknownFormat:
    """The error for a file in no format sdtool reads."""
    return UnknownFormat(f"not a model file I know: {describe(head, size)}", path=path)


# --- files that sit beside models and are not models -------------------------------------------

#: magic bytes -> what the file is; images torch.load and pickle refuse at the first byte
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
)
#: text files larger than this are never called "not a model file" (they are read whole to be
#: told apart from protocol 0 pickles): room for the tokenizer files of diffusers folders (CLIP's
#: vocab.json is 1.06 MB, T5's tokenizer.json 2.4 MB) and long wildcard lists
TEXT_LIMIT = 16 << 20


def not_a_model_file(data: bytes, size: int) -> str | None:
    """What a file is when, by its content, it is no model and nothing a loader would run.

    ``data`` is the file's first bytes (the whole file for text up to ``TEXT_LIMIT``). Returns
    "PNG image", "JPEG image", "GIF image", "WebP image", "AVIF image", "MP4 video",
    "WebM video", "SentencePiece tokenizer", "JSON text", "YAML text" or "text",
    or None when the file could be a model or anything sdtool should scan. Text is named only
    when it is at most ``TEXT_LIMIT`` (16 MiB) and UTF-8 (or UTF-16 with a byte order mark)
    without control characters. A protocol 0 pickle is text too: a caller that skips text must
    first check, with the pickle machine, that loading it as a pickle imports or calls nothing
    (the scanner does).
    """
    for magic, what in _IMAGE_MAGIC:
        if data.startswith(magic):
            return what
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP image"
    if data[4:8] == b"ftyp":  # ISO media: the animated previews Civitai serves, AVIF stills
        return "AVIF image" if data[8:12] in (b"avif", b"avis") else "MP4 video"
    if data[:4] == b"\x1aE\xdf\xa3":
        return "WebM video"
    if size == 0 or size > TEXT_LIMIT or len(data) < size:
        return None
    if _sentencepiece(data):
        return "SentencePiece tokenizer"
    # UTF-16 with its byte order mark (Windows Notepad's "Unicode"): FF FE / FE FF is no
    # pickle opcode, so pickle.load stops at byte 0
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
    try:
        text = data.decode("utf-16" if utf16 else "utf-8")
    except UnicodeDecodeError:
        return None
    if _control().search(text):  # one C loop: a 16 MiB text in milliseconds, not seconds
        return None
    if "!!python/" in text:  # YAML that an unsafe loader turns into calls: scan, do not skip
        return None
    return _text_kind(text)


@cache
def _control() -> re.Pattern[str]:
    """Control characters no text file holds (all below 32 but tab, newlines, form feed),
    compiled for the first text looked at."""
    return re.compile("[\x00-\x08\x0b\x0e-\x1f]")


#: the tags of SentencePiece's ``ModelProto`` fields (sentencepiece_model.proto), all
#: length-delimited: 1 pieces, 2 trainer_spec, 3 normalizer_spec, 4 self_test_data,
#: 5 denormalizer_spec
_SPM_TAGS = frozenset((0x0A, 0x12, 0x1A, 0x22, 0x2A))


def _sentencepiece(data: bytes) -> bool:
    """A SentencePiece model (T5's ``spiece.model`` in SD3 and Flux folders, Llama's
    ``tokenizer.model``): the whole file is ``ModelProto``'s top-level fields, each tag followed
    by its length, ending exactly at the end, the first a piece (which starts with its string,
    field 1). Byte 0 (0x0A) is no pickle opcode and no zip, tar or numpy magic: no loader runs it.
    """
    if data[:1] != b"\x0a":
        return False
    pos, end = 0, len(data)
    while pos < end:
        first = pos == 0
        if data[pos] not in _SPM_TAGS:
            return False
        length, shift, pos = 0, 0, pos + 1
        while pos < end and data[pos] & 0x80 and shift < 63:
            length |= (data[pos] & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
        if pos >= end:
            return False
        length |= data[pos] << shift
        pos += 1
        if pos + length > end or (first and data[pos : pos + 1] != b"\x0a"):
            return False
        pos += length
    return True


def _text_kind(text: str) -> str:
    """JSON, YAML or plain text, from the text itself."""
    import json

    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("{", "["):
        try:
            json.loads(stripped)
            return "JSON text"
        except ValueError:
            pass
    lines = [ln for ln in stripped.splitlines() if ln.strip() and not ln.startswith("#")]
    yaml_line = re.compile(r"^(---|\s*-\s|\s*[\w.\-\"']+\s*:(\s|$))")
    if (
        lines
        and (lines[0].startswith("---") or yaml_line.match(lines[0]))
        and all(yaml_line.match(ln) or ln[:1].isspace() for ln in lines[:50])
    ):
        return "YAML text"
    return "text"
