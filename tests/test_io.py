"""Atomic writes: nothing half-written, ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from prosparse.io import atomic_dir, write_json


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
