"""scripts/gpu_check.py, the one command that proves the GPU path, run the way CI can: --tiny, on CPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env


@pytest.mark.slow
def test_gpu_check_runs_every_exp_and_every_check(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(out)],
        cwd=REPO,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["exp"] for row in report["exps"]] == ["dcgan", "detector", "ppo", "dqn", "qa"]
    for row in report["exps"]:
        assert "error" not in row, row
        assert row["batches_per_s"] > 0 and row["items_per_s"] > 0 and row["first_step_s"] > 0, row
        assert row["resumes_on_cpu"] is True, row
    assert report["bundle_replays_on_cpu"] is True
    for key in ("guard_and_monitor_over_off", "dcgan_images_per_s", "examples_images_per_s"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert "resumes on CPU" in done.stdout and "PyTorch examples' loop" in done.stdout
