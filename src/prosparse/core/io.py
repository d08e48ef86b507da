"""Output locations: checked before the work, written under a temporary name, then renamed.

Every folder prosparse creates carries a marker file, :data:`MARKER` (``.prosparse.json``: what
wrote it and when). ``--overwrite`` replaces only a folder carrying it; anything else (a folder
or a file prosparse never wrote) is refused. An empty folder counts as absent.

:func:`check_output` is the early check a command calls before any work starts. :func:`atomic_dir`
and :func:`atomic_write` then write the result:

- a folder is reserved first (an exclusive ``flock`` on ``.<name>.lock`` beside it, released by
  the kernel if the process dies), so of two writers racing for the same target exactly one
  succeeds and the other is told why; the result is built in ``.<name>.tmp-*`` and renamed;
- a full disk (ENOSPC, EDQUOT) or a read-only location (EROFS, EACCES, EPERM) raises
  :class:`WriteError`, one line naming the path, and leaves no temporary file or folder behind.

Both error classes are :class:`~prosparse.core.errors.UsageError` (the CLI prints one line, exit 2)
and :class:`OSError` (code that falls back on an unwritable cache keeps working).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prosparse.core.errors import UsageError

log = logging.getLogger(__name__)

MARKER = ".prosparse.json"
"""File inside every folder prosparse writes: ``{"written_by", "kind", "created", "command"}``."""

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
# Errors from Rust (safetensors) and C++ (torch.save) writers carry no errno, only the text.
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")
_READ_ONLY_TEXT = ("Read-only file system", "os error 30", "Permission denied", "os error 13")


class OutputExistsError(UsageError, FileExistsError):
    """The output location is taken: it exists (and ``--overwrite`` was not given, or may not
    replace it), or another process is writing it right now."""


class WriteError(UsageError, OSError):
    """Writing an output failed for a reason the user can fix: a full disk or a read-only or
    unwritable location."""


# --- markers ------------------------------------------------------------------------------------

def write_marker(folder: str | os.PathLike, kind: str = "output", **extra) -> Path:
    """Write :data:`MARKER` into ``folder``: what wrote it (``kind``: model, run, predictors...)
    and when, plus ``extra`` JSON-ready fields."""
    from prosparse.core import __version__

    info = {"written_by": f"prosparse {__version__}", "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv), **extra}
    path = Path(folder) / MARKER
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder prosparse wrote, or None (no marker, or not readable JSON)."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_prosparse_dir(path: str | os.PathLike) -> bool:
    """True for a folder carrying :data:`MARKER`, i.e. one ``--overwrite`` may replace."""
    return Path(path).is_dir() and read_marker(path) is not None


# --- the early check ----------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def check_output(path: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False) -> Path:
    """Check, before any work, that ``path`` can receive an output; return it as a Path.

    ``kind="dir"`` (a ``--out`` folder): ``path`` must be absent or an empty folder, or, with
    ``overwrite``, a folder prosparse wrote (it carries :data:`MARKER`). A file, or a non-empty
    folder without the marker, is refused even with ``overwrite``.

    ``kind="file"`` (``--json``, ``--plot``): ``path`` must not be a folder; an existing file is
    refused unless ``overwrite`` (pass ``overwrite=True`` where a command has always replaced its
    result file).

    Either way the nearest existing parent must be a writable folder, and no other process may
    be writing ``path``. Raises :class:`OutputExistsError` or :class:`WriteError` (both
    :class:`~prosparse.core.errors.UsageError`), whose one-line message names the path and the fix.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"check_output kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path)
    _check_path(path, kind, overwrite)
    if kind == "dir" and path.parent.is_dir():
        holder = _lock_holder(path)
        if holder is not None:
            raise OutputExistsError(_busy_message(path, holder))
    return path


def _check_path(path: Path, kind: str, overwrite: bool) -> None:
    """:func:`check_output` less the reservation check (run again while holding it)."""
    if path.is_dir():
        if kind == "file":
            raise OutputExistsError(f"{path} is a folder; name a file instead "
                                    f"(e.g. {path / 'result.json'})")
        if any(path.iterdir()):
            if not is_prosparse_dir(path):
                raise OutputExistsError(
                    f"{path} already exists and was not written by prosparse (no {MARKER}), so "
                    "--overwrite will not replace it; choose another --out or remove it yourself")
            if not overwrite:
                raise OutputExistsError(f"{path} already exists; choose another --out or pass "
                                        "--overwrite")
    elif path.exists() or path.is_symlink():
        if kind == "dir":
            raise OutputExistsError(
                f"{path} is a file, not a folder prosparse wrote, so --overwrite will not replace "
                "it; choose another --out")
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another path or pass "
                                    "--overwrite")
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise WriteError(f"cannot create {path}: {parent} is a file, not a folder; choose "
                         "another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"cannot write {path}: {parent} is not writable (read-only file system "
                         "or no permission); choose another path")


# --- reservation ---------------------------------------------------------------------------------

def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _busy_message(target: Path, holder: str) -> str:
    return (f"{target} is being written by another prosparse process ({holder}); wait for it to "
            "finish or choose another --out")


def _lock_holder(target: Path) -> str | None:
    """Who holds the reservation of ``target`` (``"pid N"``), or None when nobody does."""
    lock = _lock_path(target)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown pid"
    finally:
        os.close(fd)
    return None


@contextmanager
def reserve(target: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive reservation of ``target`` for the body; another holder is an
    :class:`OutputExistsError`. The lock file is removed afterwards; a process killed while
    holding it loses the lock with its life (``flock``), so a stale lock file blocks nobody."""
    target = Path(target)
    lock = _lock_path(target)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _translate(e, target) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise OutputExistsError(_busy_message(target, holder)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


# --- writing -------------------------------------------------------------------------------------

def _full(where: Path | None) -> bool:
    try:
        return where is not None and os.statvfs(where).f_bavail == 0
    except OSError:
        return False


def _translate(e: BaseException, path: Path, where: Path | None = None) -> BaseException:
    """A :class:`WriteError` naming ``path`` for a full disk or a read-only location, else ``e``.

    ``where`` is a folder on the device written to: some writers (``torch.save``) report a full
    disk only as a short write, so a device with no free block left counts as full too (checked
    before the temporary file is removed)."""
    if isinstance(e, UsageError) or not isinstance(e, Exception):
        return e
    code = getattr(e, "errno", None)
    text = str(e)
    if code in _DISK_FULL or any(s in text for s in _DISK_FULL_TEXT) or _full(where):
        return WriteError(f"writing {path} failed: no space left on the device; free some space "
                          "or choose another location (nothing was written)")
    if code in _READ_ONLY or any(s in text for s in _READ_ONLY_TEXT):
        return WriteError(f"writing {path} failed: the location is read-only or not writable; "
                          "choose another location (nothing was written)")
    return e


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, *,
               kind: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it becomes ``target``.

    ``target`` is checked with :func:`check_output` (absent or empty, or with ``overwrite`` a
    folder prosparse wrote) and reserved for the duration, so a concurrent writer is refused.
    The marker (``kind``: what the folder holds) is written last; an existing ``target`` is
    replaced only once the new folder is complete. On failure the temporary folder is removed,
    ``target`` is untouched, and a full disk or read-only location raises :class:`WriteError`.
    """
    target = Path(target)
    check_output(target, kind="dir", overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _translate(e, target) from e
    with reserve(target):
        _check_path(target, "dir", overwrite)  # it may have changed meanwhile
        prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(glob.escape(prefix) + "*"):  # left by a killed writer: we hold the lock
            log.info("removing %s, left by an interrupted write of %s", stale, target)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        except OSError as e:
            raise _translate(e, target) from e
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
            yield tmp
            write_marker(tmp, kind)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException as e:
            err = _translate(e, target, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if err is e:
                raise
            raise err from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


RESULT_XATTR = "user.prosparse"
"""Extended attribute on every result file prosparse writes (``--json``, ``--plot``): what lets
a later command replace its own result without ``--overwrite`` and refuse anyone else's file."""


def mark_result(path: Path) -> None:
    """Tag ``path`` as a prosparse result (a no-op where the file system has no xattrs)."""
    from prosparse.core import __version__

    try:
        os.setxattr(path, RESULT_XATTR, f"prosparse {__version__}".encode())
    except (OSError, AttributeError):
        pass


def is_prosparse_result(path: str | os.PathLike) -> bool | None:
    """True for a file prosparse wrote, False for one it did not, None where the file system
    cannot say (no extended attributes)."""
    try:
        os.getxattr(path, RESULT_XATTR)
        return True
    except (AttributeError, NotImplementedError):
        return None
    except OSError as e:
        return None if e.errno in (errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", -1)) else False


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` (replacing a file there).

    A full disk or read-only location raises :class:`WriteError` naming ``path``; the temporary
    file is removed on any failure. Call :func:`check_output` first to refuse an existing file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent,
                                   suffix=path.suffix)
        os.close(fd)
        # mkstemp makes the file 0600; results are ordinary files, readable as the umask allows.
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        mark_result(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        err = _translate(e, path, path.parent if tmp is not None else None)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if err is e:
            raise
        raise err from e
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, _write)
