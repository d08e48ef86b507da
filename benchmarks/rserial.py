"""Read character data out of an R package's lazy-load database (``data/Rdata.rdx`` + ``.rdb``).

Only as much of R's XDR serialization (R Internals, "Serialization formats") as text data sets
need: character, logical, integer and double vectors, lists, pairlists with tags and attributes,
symbols and references to them. That is what the ``austen`` corpus (Debian's
``r-cran-janeaustenr``: six novels as character vectors of lines) is stored as; the reader refuses
anything else with an error naming the type, rather than guessing. No R installation is needed.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import struct
import zlib
from pathlib import Path

from prosparse.core.errors import UsageError

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _EXPR = 0, 1, 2, 9, 10, 13, 14, 16, 19, 20
_REF, _NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _MISSING = 255, 254, 242, 241, 253, 251
_NA_INT = -(2**31)
_LATIN1 = 1 << 2  # CHARSXP levels: the string is Latin-1 (UTF-8 and ASCII decode as UTF-8)


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.b, self.i, self.what = data, 0, what
        self.refs: list = []

    def _take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise UsageError(f"{self.what} is truncated (wanted {n} bytes at {self.i})")
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise UsageError(f"{self.what} is not R XDR serialization (no 'X\\n' header)")
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise UsageError(f"{self.what}: R serialization version {version} is not supported")

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _MISSING, _NIL):
            return None
        if kind == _REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            del attrs
            out = [(tag, car)]
            if isinstance(cdr, _Pairlist):
                out.extend(cdr)
            return _Pairlist(out)
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            latin1 = (flags >> 12) & _LATIN1
            return self._take(n).decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self.int()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            value = [None if v == _NA_INT else v for v in vals]
        elif kind == _REAL:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind == _STR:
            value = [self.item() for _ in range(self.int())]
        elif kind in (_VEC, _EXPR):
            value = [self.item() for _ in range(self.int())]
        else:
            raise UsageError(f"{self.what} holds an R object of type {kind}, which this reader "
                             "does not read (only vectors, lists and pairlists)")
        if has_attr:
            attrs = self.item()
            names = dict(attrs).get("names") if isinstance(attrs, _Pairlist) else None
            if kind in (_VEC, _EXPR) and names and len(names) == len(value):
                return dict(zip(names, value))
        return value


class _Pairlist(list):
    """A pairlist as ``[(tag, value), ...]``."""


def unserialize(data: bytes, what: str = "R data"):
    """An R object from XDR serialization bytes: character vector -> ``list[str | None]``,
    named list -> ``dict``, other vectors -> ``list``, pairlist -> ``[(tag, value), ...]``."""
    r = _Reader(data, what)
    r.header()
    return r.item()


def _decompress(blob: bytes, what: str) -> bytes:
    """One lazy-load record: 4 bytes of big-endian length, then zlib (R's default), or a type
    byte ``Z`` (xz), ``2`` (bzip2), ``0`` (stored) followed by the stream."""
    if len(blob) < 5:
        raise UsageError(f"{what}: record of {len(blob)} bytes is too short")
    size = struct.unpack(">I", blob[:4])[0]
    kind, rest = blob[4:5], blob[5:]
    if kind == b"Z":
        out = lzma.decompress(rest)
    elif kind == b"2":
        out = bz2.decompress(rest)
    elif kind == b"0":
        out = rest
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise UsageError(f"{what}: record decompressed to {len(out)} bytes, header says {size}")
    return out


def lazyload_objects(rdx: Path) -> dict:
    """Every variable of the lazy-load database ``rdx`` (``NAME.rdx`` beside ``NAME.rdb``), by
    name, each unserialized."""
    rdx = Path(rdx)
    rdb = rdx.with_suffix(".rdb")
    for p in (rdx, rdb):
        if not p.is_file():
            raise UsageError(f"R lazy-load database file {p} does not exist")
    index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    if not isinstance(index, dict) or "variables" not in index:
        raise UsageError(f"{rdx} is not a lazy-load index (no 'variables' entry)")
    raw = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        blob = raw[offset:offset + length]
        out[name] = unserialize(_decompress(blob, f"{rdb}:{name}"), f"{rdb}:{name}")
    return out


_AUSTEN_RDX = tuple(f"{lib}/janeaustenr/data/Rdata.rdx" for lib in (
    "usr/lib/R/site-library", "usr/local/lib/R/site-library", "usr/lib/R/library"))
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def rdata_items(rdx: Path) -> list[tuple[str, str]]:
    """``(book:chapter, text)`` from the character vectors of an R lazy-load database: each
    vector's lines joined into paragraphs (blank lines), cut into documents at chapter headings
    (a vector without them is one document)."""
    items = []
    for book, lines in sorted(lazyload_objects(rdx).items()):
        if not isinstance(lines, list) or not all(isinstance(x, str | None) for x in lines):
            continue
        chapters: list[list[str]] = [[]]
        for line in lines:
            if line is not None and _CHAPTER.match(line):
                chapters.append([])
            else:
                chapters[-1].append(line or "")
        for i, chapter in enumerate(chapters):
            paras = [" ".join(p.split()) for p in "\n".join(chapter).split("\n\n")]
            text = "\n\n".join(p for p in paras if p)
            if text:
                items.append((f"{book}:{i}", text))
    if not items:
        raise UsageError(f"{rdx} holds no character vectors to read text from")
    return items


def write_austen(root: Path, out: Path) -> int:
    """Find janeaustenr's R data under ``root`` (or the system) and write its chapters to
    ``out`` as JSON lines (``{"id", "text"}``); returns the number of chapters."""
    for base in (Path(root), Path("/")):
        for pattern in _AUSTEN_RDX:
            if (base / pattern).is_file():
                items = rdata_items(base / pattern)
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_text("".join(json.dumps({"id": i, "text": x}) + "\n" for i, x in items),
                               encoding="utf-8")
                tmp.replace(out)
                return len(items)
    raise UsageError(f"janeaustenr's R data is not under {root} or /; unpack "
                     "r-cran-janeaustenr first (make extra-data)")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/rserial.py UNPACK_ROOT OUT.jsonl")
    print(f"wrote {write_austen(Path(sys.argv[1]), Path(sys.argv[2]))} chapters to {sys.argv[2]}")
