"""Checkpoint files: a crash mid-save never breaks the last good one; loading runs no pickled code."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import SafeCheckpointIO, load_checkpoint_file, resume_checkpoint
from trainer.errors import UserError

WRITER = """
import sys, torch
from trainer.checkpoint import SafeCheckpointIO
io, i = SafeCheckpointIO(), 0
while True:  # ~32 MB per save, so a kill lands mid-write most of the time
    i += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((8_000_000,), float(i))}, "step": i}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_killing_the_writer_mid_save_leaves_a_readable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    killed_mid_write = 0
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one complete save happened
        time.sleep(0.05 + 0.07 * attempt)  # then kill at different points of a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoint = load_checkpoint_file(path)
        step = checkpoint["step"]
        assert torch.all(checkpoint["state_dict"]["w"] == step), "a checkpoint mixes two saves"
        scratch = [p for p in tmp_path.iterdir() if p.name.startswith(f".last.ckpt.tmp{proc.pid}")]
        killed_mid_write += bool(scratch)
        if killed_mid_write >= 3:
            break
    assert killed_mid_write >= 3, "the kills never landed inside a save; the test proved nothing"


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Exploit()}, path)
    with pytest.raises(UserError, match=r"corrupt or unsafe to load"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps([1, 2, 3])])
def test_corrupt_checkpoints_give_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"checkpoint .*bad.ckpt is (corrupt|not a Lightning).*resume=never"):
        load_checkpoint_file(path)


def test_a_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint_file(path)


def test_a_checkpoint_of_another_model_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    SafeCheckpointIO().save_checkpoint(
        {"state_dict": {"a.weight": torch.ones(3, 3), "b": torch.ones(2)}}, path
    )
    io = SafeCheckpointIO(expected_shapes={"a.weight": torch.Size([4, 3]), "c": torch.Size([1])})
    with pytest.raises(
        UserError, match=r"of another model .*missing.*unknown.*a.weight: \(3, 3\) vs \(4, 3\)"
    ):
        io.load_checkpoint(path)


def test_resume_never_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"earlier work")
    assert resume_checkpoint(tmp_path, "auto", None) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(tmp_path, "never", None) is None
    kept = list(tmp_path.glob("checkpoints.before-*/last.ckpt"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"earlier work"
    with pytest.raises(UserError, match="resume=sometimes is not an option"):
        resume_checkpoint(tmp_path, "sometimes", None)


def test_a_new_job_removes_the_unfinished_writes_of_a_killed_one(tmp_path: Path) -> None:
    checkpoints, bundle = tmp_path / "checkpoints", tmp_path / "divergence" / "step000005-nonfinite"
    for folder in (checkpoints, bundle):
        folder.mkdir(parents=True)
    kept = [checkpoints / "last.ckpt", checkpoints / "best-epoch000-step000004.ckpt", bundle / "bundle.pt"]
    unfinished = [
        checkpoints / ".last.ckpt.tmp4242",
        checkpoints / ".best.ckpt.tmp17",
        bundle / ".bundle.pt.tmp9",
    ]
    for path in kept + unfinished:
        path.write_bytes(b"x")
    assert resume_checkpoint(tmp_path, "auto", None, keep_old=False) == str(checkpoints / "last.ckpt")
    assert all(path.exists() for path in unfinished)  # (not the process that tidies)
    assert resume_checkpoint(tmp_path, "auto", None) == str(checkpoints / "last.ckpt")
    assert all(path.exists() for path in kept) and not any(path.exists() for path in unfinished)
