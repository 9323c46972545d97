"""The real command line, end to end: train, read the W&B offline run back, resume into the same run."""

import json
import os
from pathlib import Path

import pytest
from helpers import TINY_DCGAN, run_cli
from wandb_offline import find_runs, read_run

from trainer.cli.preflight import unwritable_run_dir


def test_a_run_dir_is_read_as_hydra_reads_it_and_checked_without_being_made(tmp_path: Path) -> None:
    quoted = f'hydra.run.dir="{tmp_path}/a/b"'  # as Lightning's DDP launcher passes it to rank 1
    assert unwritable_run_dir([quoted, f"++hydra.sweep.dir={tmp_path}/c"]) is None
    assert list(tmp_path.iterdir()) == []  # nothing made, least of all a folder named '"'
    (tmp_path / "file").write_text("")
    problem = unwritable_run_dir([f"hydra.run.dir={tmp_path}/file/run"])
    assert problem == (
        f"hydra.run.dir={tmp_path}/file/run cannot be created ({tmp_path}/file is a file): "
        "choose a folder you can write"
    )
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # (root writes anywhere)
        assert "is not writable" in unwritable_run_dir([f"hydra.run.dir={locked}/run"])


@pytest.mark.slow
def test_dcgan_trains_logs_to_wandb_and_resumes_into_the_same_run(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *TINY_DCGAN,
        f"hydra.run.dir={run_dir}",
        "callbacks.gradients.log_every_n_steps=2",
        "callbacks.gradients.histogram_every_n_steps=4",
    ]
    first = run_cli(*args, "++trainer.max_epochs=1", home=home)
    assert first.returncode == 0, first.stderr[-3000:]

    # The run dir: resolved config, checkpoints, the W&B pointer, metrics.json.
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    pointer = json.loads((run_dir / "wandb_run.json").read_text())
    assert pointer["mode"] == "offline"  # no API key in the test's environment
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train/loss_d", "train/loss_g", "train/D_x", "train/D_G_z", "val/pixel_fd"):
        assert {"final", "best", "best_step", "mode"} <= metrics[key].keys()
    assert metrics["val/pixel_fd"]["mode"] == "min"

    (run_path,) = find_runs(run_dir / "wandb")
    run = read_run(run_path)
    assert run.run_id == pointer["id"]
    keys = run.history_keys()
    for key in ("train/loss_d", "train/loss_g", "train/D_x", "train/D_G_z", "val/pixel_fd"):
        assert key in keys
    # Per-layer gradient norms and histograms, per network.
    assert {"grad_norm/generator/net.0", "grad_norm/generator/total", "grad_norm/discriminator/total"} <= set(
        keys
    )
    assert any(k.startswith("grad_hist/generator/") for k in keys)
    assert any(k.startswith("grad_hist/discriminator/") for k in keys)
    norms = [v for _, v in run.series("grad_norm/generator/total")]
    assert norms and all(v > 0 for v in norms)
    # Weight norms and update-to-weight ratios per layer and network, from the same logging steps.
    assert {
        "param_norm/discriminator/net.0",
        "update_ratio/generator/net.0",
        "update_ratio/discriminator/total",
    } <= set(keys)
    ratios = [v for _, v in run.series("update_ratio/generator/total")]
    assert ratios and all(0 < v < 1 for v in ratios)  # Adam at 2e-4 moves weights by a small fraction
    # The sample grid, the config with the git commit, the checkpoint artifact.
    assert any(f.startswith("media/images/samples") and f.endswith(".png") for f in run.files)
    assert run.config["name"] == "dcgan" and run.config["model"]["generator"]["width"] == 8
    assert "commit" in run.config["git"]
    assert any(a["type"] == "model" and any(p.endswith(".ckpt") for p in a["files"]) for a in run.artifacts)
    assert list(run_dir.glob("samples/samples_epoch000.png"))

    second = run_cli(*args, "++trainer.max_epochs=2", home=home)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr + second.stdout
    runs = [read_run(p) for p in find_runs(run_dir / "wandb")]
    assert len(runs) == 2 and {r.run_id for r in runs} == {pointer["id"]}  # one W&B run, continued
    steps = [v for _, v in runs[1].series("trainer/global_step")]
    assert steps and min(steps) >= 4  # the second part logs from where the first stopped (4 batches)
    # The best loss_d of both parts: the state of metrics.json travelled in the checkpoint.
    best = json.loads((run_dir / "metrics.json").read_text())["train/loss_d"]["best"]
    assert best == pytest.approx(min(v for r in runs for _, v in r.series("train/loss_d")), rel=1e-6)


@pytest.mark.slow
def test_two_process_ddp_makes_one_wandb_run_and_distinct_rank_streams(tmp_path: Path, home: Path) -> None:
    """Run from an empty folder, which it leaves empty: Lightning starts rank 1 with the run dir quoted,
    and that must not become a folder named `"/tmp/...` there."""
    import torch

    run_dir, here = tmp_path / "run", tmp_path / "cwd"
    here.mkdir()
    result = run_cli(
        *TINY_DCGAN,
        "trainer=ddp_cpu",
        "++trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
        home=home,
        cwd=here,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(here.iterdir()) == []
    assert len(find_runs(run_dir / "wandb")) == 1  # only rank 0 creates a W&B run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8  # 4 batches per rank, 2 optimizers
    (rng,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("RNGState")]
    rank0, rank1 = rng["ranks"]
    assert not torch.equal(rank0["torch"], rank1["torch"])  # GAN noise differs between data-parallel ranks
