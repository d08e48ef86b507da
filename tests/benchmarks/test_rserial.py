"""The R lazy-load reader that ``make extra-data`` turns the ``austen`` corpus into text with, on
databases written here byte by byte (R's XDR serialization, version 3), and the
``austen``/``pydoc`` sources' folder lookup."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from benchmarks.rserial import lazyload_objects, rdata_items, unserialize, write_austen
from prosparse.core.errors import UsageError
from prosparse.data import load_texts

HEADER = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b  # UTF-8 flag in the levels, as R writes it


def _strsxp(xs: list[str | None]) -> bytes:
    return _i(16) + _i(len(xs)) + b"".join(_char(x) for x in xs)


def _real(xs: list[float]) -> bytes:
    return _i(14) + _i(len(xs)) + b"".join(struct.pack(">d", x) for x in xs)


def _named_list(items: dict[str, bytes]) -> bytes:
    """VECSXP with a names attribute: the attribute pairlist (tag 'names', value STRSXP)."""
    body = _i(19 | (1 << 9)) + _i(len(items)) + b"".join(items.values())
    attr = _i(2 | (1 << 10)) + _i(1) + _char("names") + _strsxp(list(items)) + _i(254)
    return body + attr


def _write_db(folder, objects: dict[str, list[str | None]]):
    rdb, variables, offset = b"", {}, 0
    for name, lines in objects.items():
        payload = HEADER + _strsxp(lines)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        variables[name] = _real([offset, len(record)])
        rdb += record
        offset += len(record)
    index = HEADER + _named_list({"variables": _named_list(variables),
                                  "compressed": _i(10) + _i(1) + _i(1)})
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(index))
    return folder / "Rdata.rdx"


def test_unserialize_vectors_and_refusals():
    assert unserialize(HEADER + _strsxp(["a", None, "ü"])) == ["a", None, "ü"]
    latin1 = _i(9 | (1 << 14)) + _i(1) + b"\xe9"
    assert unserialize(HEADER + _i(16) + _i(1) + latin1) == ["é"]
    assert unserialize(HEADER + _real([1.5, 2.0])) == [1.5, 2.0]
    assert unserialize(HEADER + _named_list({"x": _real([3.0])})) == {"x": [3.0]}
    with pytest.raises(UsageError, match="not R XDR serialization"):
        unserialize(b"A\n" + HEADER[2:])
    with pytest.raises(UsageError, match="type 3, which this reader does not read"):
        unserialize(HEADER + _i(3))
    with pytest.raises(UsageError, match="truncated"):
        unserialize(HEADER + _i(16) + _i(2) + _char("only one"))


def test_lazyload_database_round_trip(tmp_path):
    emma = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich.", "",
            "She was the youngest.", "CHAPTER II", "Mr. Weston was a native."]
    rdx = _write_db(tmp_path, {"emma": emma, "tiny": ["one line"]})
    objs = lazyload_objects(rdx)
    assert objs == {"emma": emma, "tiny": ["one line"]}
    docs = [text for _, text in rdata_items(rdx)]  # chapters cut at their headings
    assert docs == ["EMMA", "Emma Woodhouse, handsome, clever, and rich.\n\nShe was the youngest.",
                    "Mr. Weston was a native.", "one line"]
    (tmp_path / "Rdata.rdb").unlink()
    with pytest.raises(UsageError, match=r"Rdata.rdb does not exist"):
        lazyload_objects(rdx)


def test_austen_and_pydoc_found_under_an_unpack_root(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("PROSPARSE_DEB_ROOT", str(tmp_path / "deb"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))  # not this environment's copy
    lib = tmp_path / "deb/usr/lib/R/site-library/janeaustenr/data"
    lib.mkdir(parents=True)
    _write_db(lib, {"persuasion": ["Chapter 1", "Sir Walter Elliot, of Kellynch Hall."]})
    with pytest.raises(UsageError, match="make extra-data"):  # R data alone is not read
        load_texts("austen", "all")
    from prosparse.data.sources import AUSTEN_JSONL

    assert write_austen(tmp_path / "deb", tmp_path / "deb" / AUSTEN_JSONL) == 1
    assert load_texts("austen", "all") == ["Sir Walter Elliot, of Kellynch Hall."]
    src = tmp_path / "deb/usr/share/doc/python3.11/html/_sources/library"
    src.mkdir(parents=True)
    (src / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous operating system interfaces\n")
    assert load_texts("pydoc", "all") == [
        ":mod:`os` --- Miscellaneous operating system interfaces"]


def test_missing_debian_corpus_names_the_fix(tmp_path, monkeypatch):
    import prosparse.data.sources as sources

    monkeypatch.setattr(sources, "_debian_roots", lambda: [tmp_path])
    with pytest.raises(UsageError, match=r"data 'austen' is not installed .*make extra-data"):
        load_texts("austen", "all")
    with pytest.raises(UsageError, match=r"data 'pydoc' is not installed .*python3.11-doc"):
        load_texts("pydoc", "all")
