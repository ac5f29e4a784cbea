"""Training-state checkpoints: exact resume under torchrun (gloo), and the checkpoint-directory helpers.

tests/dist/training_state_roundtrip.py does the Megatron work; see its docstring for what it compares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_torchrun
from megatron_hbpo.megatron.checkpoint import TRAINER_STATE, checkpoint_dir, list_checkpoints, prune_checkpoints, \
    resolve_resume


# -- exact resume (torchrun) -------------------------------------------------------------------------


@pytest.mark.dist
def test_exact_resume_single_process_with_failure_and_mismatch_checks(tmp_path):
    [report] = run_torchrun("training_state_roundtrip.py", "--dir", str(tmp_path), "checks", nproc=1).reports
    assert report["passed"] == ["[checks] OK saved step_0000002", "OK failure checks", "[checks] OK exact resume",
                                "OK mismatch checks"]


@pytest.mark.dist
def test_exact_resume_two_ranks_and_reshard(tmp_path):
    """DP=2 with the distributed optimizer, then loaded at TP=2 (DP=1); TP=2 with the standard
    optimizer, then loaded at TP=1 (DP=2). Both cases in one torchrun: importing Megatron dominates."""
    result = run_torchrun("training_state_roundtrip.py", "--dir", str(tmp_path), "distopt,reshard=2x1",
                          "tp=2,reshard=1x1", nproc=2)
    assert len(result.reports) == 2
    for report in result.reports:  # every rank passed every check of both cases
        assert report["passed"] == [
            "[distopt,reshard=2x1] OK saved step_0000002", "[distopt,reshard=2x1] OK exact resume",
            "[distopt,reshard=2x1] OK resharded resume (TP, PP) (1, 1) -> (2, 1)",
            "[tp=2,reshard=1x1] OK saved step_0000002", "[tp=2,reshard=1x1] OK exact resume",
            "[tp=2,reshard=1x1] OK resharded resume (TP, PP) (2, 1) -> (1, 1)"]


# -- checkpoint directories (no Megatron) ----------------------------------------------------------


def make_complete(root: Path, step: int) -> Path:
    path = checkpoint_dir(root, step)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return path


def test_checkpoint_dir_names_steps_with_seven_digits(tmp_path):
    assert checkpoint_dir(tmp_path, 40) == tmp_path / "step_0000040"
    assert checkpoint_dir(str(tmp_path), 1234567).name == "step_1234567"


def test_list_checkpoints_sorted_complete_only(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    later, earlier = make_complete(tmp_path, 120), make_complete(tmp_path, 20)
    make_complete(tmp_path, 9).rename(tmp_path / ".step_0000200.tmp")  # an interrupted save
    (tmp_path / "step_0000300").mkdir()  # no trainer_state.json
    make_complete(tmp_path, 5).rename(tmp_path / "step_5")  # not the 7-digit name
    (tmp_path / "step_0000400").write_text("a file, not a directory")
    assert list_checkpoints(tmp_path) == [earlier, later]


def test_prune_keeps_newest_and_removes_stale_tmp(tmp_path):
    steps = [make_complete(tmp_path, s) for s in (10, 20, 30, 40)]
    stale = tmp_path / ".step_0000050.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    half_deleted = tmp_path / ".step_0000005.deleting"  # a prune that crashed mid-way
    half_deleted.mkdir()
    incomplete = tmp_path / "step_0000060"
    incomplete.mkdir()  # not ours to judge: left alone
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert set(removed) == {steps[0], steps[1], stale, half_deleted}
    assert list_checkpoints(tmp_path) == steps[2:]
    assert incomplete.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000030", "step_0000040", "step_0000060"]
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_resolve_resume(tmp_path):
    root = tmp_path / "ckpt"
    assert resolve_resume("none", root) is None
    assert resolve_resume("auto", root) is None  # no root yet: a fresh start
    root.mkdir()
    (root / ".step_0000090.tmp").mkdir()
    assert resolve_resume("auto", root) is None
    make_complete(root, 10)
    newest = make_complete(root, 30)
    (root / "step_0000040").mkdir()  # incomplete: never picked
    assert resolve_resume("auto", root) == newest
    assert resolve_resume("none", root) is None
    assert resolve_resume(str(newest), root) == newest


def test_resolve_resume_explicit_path_errors_name_it(tmp_path):
    root = tmp_path / "ckpt"
    make_complete(root, 10)
    incomplete = root / "step_0000040"
    incomplete.mkdir()
    with pytest.raises(FileNotFoundError, match=r"step_0000040.*not a complete .*trainer_state\.json.*step_0000010"):
        resolve_resume(str(incomplete), root)
    missing = tmp_path / "nowhere" / "step_0000001"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such checkpoint directory")):
        resolve_resume(str(missing), root)
    with pytest.raises(FileNotFoundError, match=r"did you mean .*ckpt/step_0000010"):
        resolve_resume("step_0000010", root)
