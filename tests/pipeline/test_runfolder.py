"""Atomic writes and run folders: nothing half-written, nothing foreign overwritten."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import prunegraph.pipeline.runfolder as rf
from prunegraph.errors import SpecError
from prunegraph.pipeline.runfolder import (
    MARKER,
    RunFolder,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def listing(path):
    return sorted(p.name for p in path.iterdir())


# ------------------------------------------------------------------------------ atomic files


def test_atomic_write_text_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert listing(target.parent) == ["b.txt"]
    assert target.stat().st_mode & 0o777 == 0o644
    target.chmod(0o600)
    atomic_write_text(target, "three")
    assert target.stat().st_mode & 0o777 == 0o600  # an existing file keeps its mode


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(rf.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["m.json"]


def test_failed_write_of_new_file_leaves_nothing(tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    real_fdopen = os.fdopen

    def fdopen(fd, mode):
        f = real_fdopen(fd, mode)

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[: len(data) // 2])
                raise Boom

        return Half()

    monkeypatch.setattr(rf.os, "fdopen", fdopen)
    with pytest.raises(Boom):
        atomic_write_text(tmp_path / "x.txt", "abcdef")
    assert listing(tmp_path) == []


def test_json_serialisation_failure_writes_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError, match="cannot write object"):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert listing(tmp_path) == ["metrics.json"]


def test_json_accepts_paths_sets_and_array_scalars(tmp_path):
    import numpy as np
    import torch

    atomic_write_json(tmp_path / "m.json", {"p": tmp_path, "s": {2, 1}, "n": np.float32(0.5),
                                            "t": torch.tensor([1, 2]), "tup": (1, 2)})
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "p": str(tmp_path), "s": [1, 2], "n": 0.5, "t": [1, 2], "tup": [1, 2]}


@settings(max_examples=30, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                          max_size=3),
                    max_leaves=10))
def test_json_round_trip_property(tmp_path_factory, obj):
    target = tmp_path_factory.mktemp("j") / "x.json"
    atomic_write_json(target, obj)
    assert json.loads(target.read_text()) == obj


# ------------------------------------------------------------------------------- atomic dirs


def test_atomic_dir_success_and_replace(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        assert tmp.name.startswith("model.tmp-")
        (tmp / "w.bin").write_bytes(b"1")
    assert listing(tmp_path) == ["model"]
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert listing(tmp_path / "model") == ["v.bin"]
    assert listing(tmp_path) == ["model"]


def test_atomic_dir_failure_leaves_old_folder_untouched(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "good.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "half.bin").write_bytes(b"2")
            raise RuntimeError("crash while saving")
    assert listing(tmp_path) == ["model"]
    assert listing(tmp_path / "model") == ["good.bin"]


def test_atomic_dir_failure_on_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "half.bin").write_bytes(b"2")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_atomic_dir_refuses_existing_without_overwrite(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(tmp_path / "model", overwrite=False):
            pass


# ------------------------------------------------------------------------------- run folders


def test_new_and_empty_folders_are_accepted(tmp_path):
    RunFolder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    RunFolder(tmp_path / "empty")


def test_foreign_nonempty_folder_is_refused_with_the_fix(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(SpecError, match=r"not a prunegraph run folder.*another --out.*--overwrite"):
        RunFolder(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match="is not a folder"):
        RunFolder(tmp_path / "f")


def test_overwrite_replaces_a_foreign_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    folder = RunFolder(out, overwrite=True)
    with folder:
        folder.open({"passes": []})
    assert listing(out) == [MARKER, "log.txt", "spec.yaml"]


def test_previous_run_folder_is_replaced(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as folder:
        folder.open({"passes": [{"A": {}}]})
        (folder.model_dir).mkdir()
    assert RunFolder.is_run_folder(out)
    with RunFolder(out) as folder:
        folder.open({"passes": []})
        folder.write_metrics({"x": 1})
    assert listing(out) == [MARKER, "log.txt", "metrics.json", "spec.yaml"]
    assert yaml.safe_load((out / "spec.yaml").read_text()) == {"passes": []}


def test_refuses_to_replace_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="holds the current directory"):
        RunFolder(".", overwrite=True)


def test_metrics_never_fail_on_odd_values(tmp_path):
    class Odd:
        def __repr__(self):
            return "<odd>"

    folder = RunFolder(tmp_path / "run")
    folder.write_metrics({"stats": {"x": Odd()}})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"stats": {"x": "<odd>"}}


def test_log_handler_attached_only_while_open(tmp_path):
    log = logging.getLogger("prunegraph.test")
    folder = RunFolder(tmp_path / "run")
    folder.open({"passes": []})
    assert folder.is_open
    log.info("inside the run")
    folder.close()
    log.info("after the run")
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "inside the run" in text and "after the run" not in text
    assert not folder.is_open
    folder.close()  # idempotent
