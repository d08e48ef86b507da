"""Atomic writes: nothing half-written, ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from prosparse.core.io import atomic_dir, write_json


def test_write_json_is_atomic_and_readable(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_dir_permissions(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


# --- output locations: marker, overwrite, reservation, disk full, read-only -------------------

import errno  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from prosparse.core.errors import UsageError  # noqa: E402
from prosparse.core.io import (  # noqa: E402
    OutputExistsError,
    WriteError,
    atomic_write,
    check_output,
    is_prosparse_dir,
    read_marker,
)


def _write_one(tmp_path, name="out", overwrite=False, text="new"):
    with atomic_dir(tmp_path / name, overwrite=overwrite, kind="test") as tmp:
        (tmp / "f").write_text(text)
    return tmp_path / name


def test_marker_records_what_wrote_the_folder_and_when(tmp_path):
    out = _write_one(tmp_path)
    info = read_marker(out)
    assert info["kind"] == "test" and info["written_by"].startswith("prosparse ")
    assert info["created"].endswith("Z") and is_prosparse_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or temp left


def test_overwrite_replaces_only_a_folder_prosparse_wrote(tmp_path):
    out = _write_one(tmp_path, text="old")
    with pytest.raises(OutputExistsError, match="already exists; choose another --out or pass "
                                                "--overwrite"):
        _write_one(tmp_path)
    _write_one(tmp_path, overwrite=True, text="new")
    assert (out / "f").read_text() == "new"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=rf"{foreign} already exists and was not "
                                                    r"written by prosparse \(no \.prosparse"):
            _write_one(tmp_path, "mine", overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    plain = tmp_path / "file.bin"
    plain.write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=rf"{plain} is a file, not a folder prosparse "
                                                    "wrote"):
            _write_one(tmp_path, "file.bin", overwrite=overwrite)
    assert plain.read_text() == "keep"
    assert isinstance(OutputExistsError("x"), UsageError)


def test_an_empty_folder_counts_as_absent(tmp_path):
    (tmp_path / "out").mkdir()
    assert (_write_one(tmp_path) / "f").read_text() == "new"


def test_check_output_before_the_work(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "new") == tmp_path / "a" / "b" / "new"
    assert check_output(tmp_path / "r.json", kind="file") == tmp_path / "r.json"
    with pytest.raises(OutputExistsError, match=rf"{tmp_path} is a folder; name a file instead"):
        check_output(tmp_path, kind="file")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="r.json already exists; choose another path"):
        check_output(tmp_path / "r.json", kind="file")
    check_output(tmp_path / "r.json", kind="file", overwrite=True)
    with pytest.raises(WriteError, match=r"cannot create .*r.json/x: .*r.json is a file"):
        check_output(tmp_path / "r.json" / "x", kind="file")
    with pytest.raises(ValueError, match="kind must be 'dir' or 'file'"):
        check_output(tmp_path / "x", kind="folder")


def test_racing_writers_exactly_one_wins(tmp_path):
    """Two writers of the same --out: the one that comes second while the first is still writing
    is told who holds it; several started together: exactly one result, every other refused."""
    target = tmp_path / "out"
    inside, release = threading.Event(), threading.Event()

    def slow():
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("first")
            inside.set()
            release.wait(10)

    first = threading.Thread(target=slow)
    first.start()
    assert inside.wait(10)
    with pytest.raises(OutputExistsError, match=rf"{target} is being written by another prosparse "
                                                rf"process \(pid {os.getpid()}\)"):
        check_output(target)
    with pytest.raises(OutputExistsError, match="is being written by another prosparse process"):
        _write_one(tmp_path)
    release.set()
    first.join()
    assert (target / "f").read_text() == "first"

    # Four processes (forked: prosparse is already imported) started together on a fresh target.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    race, go, results = tmp_path / "race", ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(race, str(i), go, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    winners = [who for who, msg in outcomes.items() if msg == "wrote"]
    assert len(winners) == 1, outcomes
    assert (race / "who").read_text() == winners[0]
    for who, msg in outcomes.items():
        if who not in winners:
            assert msg.startswith(("OutputExistsError:", )) and (
                "is being written by another prosparse process" in msg
                or "already exists; choose another --out" in msg), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "race"]


def _race_writer(target, who, go, results):
    go.wait()
    try:
        with atomic_dir(target) as tmp:
            (tmp / "who").write_text(who)
            time.sleep(0.3)
        results.put((who, "wrote"))
    except Exception as e:
        results.put((who, f"{type(e).__name__}: {e}"))


def test_stale_lock_and_temp_of_a_killed_writer_block_nobody(tmp_path):
    (tmp_path / ".out.lock").write_text("pid 999999")  # killed: the kernel released its flock
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.tmp-abc" / "half").write_text("x")
    check_output(tmp_path / "out")
    _write_one(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "the location is read-only"),
                                        (errno.EACCES, "the location is read-only")])
def test_write_failure_says_why_and_leaves_nothing(tmp_path, code, says):
    target = tmp_path / "out"

    def fail(tmp):
        (tmp / "half" if tmp.is_dir() else tmp).write_text("x")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError, match=rf"writing {target} failed: {says}"):
        with atomic_dir(target) as tmp:
            fail(tmp)
    with pytest.raises(WriteError, match=rf"writing {tmp_path / 'r.pt'} failed: {says}"):
        atomic_write(tmp_path / "r.pt", fail)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(WriteError("x"), OSError) and isinstance(WriteError("x"), UsageError)


@contextmanager
def _tmpfs(path, size="64k", read_only=False):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_for_real(tmp_path, llama, tokenizer):
    """A 64 KiB tmpfs: saving a model (safetensors) and a torch file (a short write, no errno)
    both end in one line naming the path, with nothing left on the device."""
    import torch

    from prosparse.models import save_model

    with _tmpfs(tmp_path / "small") as small:
        with pytest.raises(WriteError, match=rf"writing {small / 'ckpt'} failed: no space left"):
            save_model(llama, tokenizer, small / "ckpt")
        with pytest.raises(WriteError, match=rf"writing {small / 'b.pt'} failed: no space left"):
            atomic_write(small / "b.pt", lambda tmp: torch.save(torch.zeros(100_000), tmp))
        assert list(small.iterdir()) == []


def test_read_only_location_for_real(tmp_path):
    with _tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(WriteError, match=rf"cannot write {ro / 'out'}: {ro} is not writable"):
            check_output(ro / "out")
        with pytest.raises(WriteError, match=rf"cannot write {ro / 'r.json'}: {ro} is not "
                                             "writable"):
            check_output(ro / "r.json", kind="file")
        with pytest.raises(WriteError, match=rf"writing {ro / 'r.json'} failed: the location is "
                                             "read-only"):
            write_json(ro / "r.json", {})
