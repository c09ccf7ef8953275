"""The shared helpers: atomic writes, storage locations, the run layout, value coercion,
perplexity."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from sedd_ray import io
from sedd_ray.layout import RunLayout, StudyLayout, TrainerFiles
from sedd_ray.values import coerce, perplexity

# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.json"
    io.atomic_write(path, "old")
    assert path.read_text() == "old"
    io.atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        io.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temp file


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("rename"), real_replace(a, b)))
    io.atomic_write(tmp_path / "f", "x")
    assert order == ["fsync", "rename"]


def test_atomic_write_on_a_pyarrow_filesystem(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    io.atomic_write("t.bin", b"abc", fs=fs)
    assert (tmp_path / "t.bin").read_bytes() == b"abc"
    with pytest.raises(ValueError):
        io.atomic_write("t.bin", lambda f: (f.write(b"x"), (_ for _ in ()).throw(ValueError())),
                        fs=fs)
    assert (tmp_path / "t.bin").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_atomic_dir_replaces_or_keeps_and_cleans_up(tmp_path):
    final = tmp_path / "cache" / "k"
    io.atomic_dir(final, lambda d: (d / "meta.json").write_text("1"))
    io.atomic_dir(final, lambda d: (d / "meta.json").write_text("2"), keep_existing=True)
    assert (final / "meta.json").read_text() == "1"  # another writer got there first
    io.atomic_dir(final, lambda d: (d / "meta.json").write_text("3"))
    assert (final / "meta.json").read_text() == "3"
    with pytest.raises(OSError):
        io.atomic_dir(final, lambda d: (_ for _ in ()).throw(OSError("full")))
    assert [p.name for p in final.parent.iterdir()] == ["k"]


# --- storage locations ------------------------------------------------------------------------


def test_local_and_remote_storage_are_told_apart_the_same_way_everywhere(tmp_path):
    assert io.is_local("results") and io.is_local(str(tmp_path)) and io.is_local("file:///x")
    assert not io.is_local("s3://b/r") and not io.is_local("gs://b/r")
    assert io.local_path(f"file://{tmp_path}/") == tmp_path
    assert io.local_path("results") == Path.cwd() / "results"
    assert io.local_path("s3://b/r") is None
    assert io.normalize(f"file://{tmp_path}") == io.normalize(str(tmp_path)) == str(tmp_path)
    assert io.normalize("gs://b/r/") == "gs://b/r"
    assert io.join("s3://b/r/", "s", "runs") == "s3://b/r/s/runs"
    fs, path, local = io.filesystem(f"file://{tmp_path}")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path) and local


# --- layout -----------------------------------------------------------------------------------


def test_layout_of_a_study_its_trials_and_runs():
    s = StudyLayout("s3://b/res", "abl")
    assert s.dir == "s3://b/res/abl"
    assert s.trials_file.startswith(s.dir + "/") and s.history_dir.startswith(s.dir + "/")
    assert s.history_part("t1", 3).startswith(s.history_dir + "/")
    run = s.trial("t1")
    assert run == RunLayout(s.train_dir, "t1") == RunLayout.at(run.dir)
    assert run.trainer_dir.startswith(run.dir + "/")
    assert run.trainer_files() is None  # the trainer's files stay on its worker
    study = StudyLayout("/r", "abl")
    local = study.trial("t1").trainer_files()
    assert local.root == Path(study.dir, study.relative(study.trial("t1").trainer_dir))
    assert not study.relative(study.trial("t1").trainer_dir).startswith("/")
    files = TrainerFiles("/o")
    assert len({files.metrics, files.samples, files.final, files.checkpoints}) == 4
    assert all(p.parent == Path("/o") for p in (files.metrics, files.final, files.checkpoints))


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, typ, want", [
    ("yes", bool, True), (" False ", bool, False), (1, bool, True), (np.bool_(True), bool, True),
    ("1e3", int, 1000), (4.0, int, 4), (np.int64(7), int, 7), ("0.5", float, 0.5),
    (3, float, 3.0), (np.float32(0.25), float, 0.25), ("abc", str, "abc"),
    (Path("/x"), str, "/x"), ([1], list, [1]),
])
def test_coerce_reads_flags_files_and_numpy_alike(value, typ, want):
    got = coerce(value, typ, "k")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value, typ, message", [
    ("maybe", bool, "x.y must be a bool"), (2, bool, "a bool"), (1.5, int, "x.y must be int"),
    (True, int, "must be int"), ("fast", float, "x.y must be a number, got 'fast'"),
    (True, float, "a number"), (5, str, "a string"),
])
def test_coerce_refuses_with_the_field_and_the_value(value, typ, message):
    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match=message):
        coerce(value, typ, "x.y", Custom)


def test_perplexity_from_nll():
    assert perplexity(0.0) == 1.0 and perplexity(math.log(7)) == pytest.approx(7)
    assert math.isfinite(perplexity(1e6))
