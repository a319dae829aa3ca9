"""Atomic outputs and staging clean-up survive an interrupt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onnxcompress.runtime import outputs


def test_remove_tree_finishes_when_interrupted_while_removing(tmp_path: Path, monkeypatch) -> None:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "model.bin").write_bytes(b"x" * 10)
    real, calls = shutil.rmtree, []

    def interrupted_once(path, ignore_errors=False):
        calls.append(path)
        if len(calls) == 1:
            real(Path(path) / "sub", ignore_errors=ignore_errors)  # part of the tree is gone, then Ctrl-C
            raise KeyboardInterrupt
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        outputs.remove_tree(staging)
    assert not staging.exists() and len(calls) == 2


def test_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")

    def interrupt(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_text_atomic(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"] and target.read_text() == "old"
