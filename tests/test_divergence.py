"""Divergence forensics: detection at the right step, the bundle, replay, the actions, DDP agreement, tools."""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_DCGAN, cli_env, compose_config, run_cli
from wandb_offline import find_runs, read_run

from trainer.divergence.bundle import load_bundle
from trainer.divergence.checks import InitialLossCheck, gradient_check
from trainer.divergence.detectors import CollapseDetector, RollingZScore
from trainer.errors import UserError
from trainer.replay import replay
from trainer.run import train

FAST = [*TINY_DCGAN, "logger=none", "++trainer.max_epochs=1", "++trainer.limit_train_batches=8"]


def events(run_dir: Path, rank: int = 0) -> list[dict]:
    lines = (run_dir / "divergence" / f"events-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_poisoned_batch_halts_at_its_step_and_replays_anywhere(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(*TINY_DCGAN, "divergence.inject.step=3", "divergence.action=halt", "++trainer.max_epochs=1",
                     "++trainer.limit_train_batches=8", f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: divergence at step 3: non-finite gradients in discriminator" in result.stderr
    bundle = run_dir / "divergence" / "step000003-nonfinite"
    assert (bundle / "bundle.pt").is_file() and (run_dir / "checkpoints" / "halt-step000003.ckpt").is_file()
    content = load_bundle(bundle)
    assert content["step"] == 3 and content["batch_idx"] == 3 and content["epoch"] == 0
    assert torch.isnan(content["batch"][0]).all() and not torch.isnan(content["batch"][1:]).any()
    assert {"python", "numpy", "torch"} <= content["rng"].keys()
    assert all(torch.isfinite(v).all() for v in content["state_dict"].values())  # from before the bad update
    assert len(content["optimizer_states"]) == 2 and "name: dcgan" in content["config"]
    (wandb_run,) = find_runs(run_dir / "wandb")
    assert any(a["type"] == "divergence" for a in read_run(wandb_run, strict=False).artifacts)

    replayed = subprocess.run([sys.executable, "-m", "trainer.replay", str(bundle)], env=cli_env(home),
                              capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert "reproduced" in replayed.stdout and "did not reproduce" not in replayed.stdout
    assert "first layer with a non-finite output: discriminator.net.0" in replayed.stdout  # it ate the batch


def test_replay_names_a_poisoned_layer_and_tests_a_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(*FAST, "divergence.inject.step=2", "divergence.inject.kind=nan_weight",
                         "divergence.inject.layer=generator.net.3", "divergence.action=halt", run_dir=run_dir)
    with pytest.raises(UserError, match="divergence at step 2"):
        train(cfg)
    bundle = run_dir / "divergence" / "step000002-nonfinite"
    reproduced, probe, _ = replay(str(bundle))
    assert reproduced and probe.first_nonfinite_output == "generator.net.3"
    nonfinite_rows = [layer for layer in probe.order if not math.isfinite(probe.output_max[layer])]
    assert "generator.net.0" not in nonfinite_rows and "generator.net.3" in nonfinite_rows  # the step only


def test_spike_bundle_replays_and_a_lower_lr_is_checked(tmp_path: Path) -> None:
    """huge_lr wrecks the weights; the next batches spike, and a replay can try a smaller learning rate."""
    run_dir = tmp_path / "run"
    cfg = compose_config(*FAST, "++trainer.limit_train_batches=12", "divergence.inject.step=6",
                         "divergence.inject.kind=huge_lr", "divergence.spike.warmup=3", "divergence.spike.window=10",
                         "divergence.action=warn", run_dir=run_dir)
    train(cfg)
    detected = events(run_dir)
    assert detected and detected[0]["step"] >= 6
    bundle = Path(detected[0]["bundle"])
    reproduced, probe, _ = replay(str(bundle))
    assert reproduced
    _, probe_low_lr, _ = replay(str(bundle), lr=1e-6, clip=1.0, precision="bf16-mixed")
    assert probe_low_lr.losses and probe_low_lr.order == probe.order  # the fix under test ran the same step


def test_skip_drops_the_bad_update_and_finishes_with_finite_weights(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_config(*FAST, "divergence.inject.step=2", "divergence.action=skip", run_dir=run_dir))
    (event,) = events(run_dir)
    assert event["step"] == 2 and event["action"] == "skip" and event["detector"] == "nonfinite"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    generator_adam, discriminator_adam = checkpoint["optimizer_states"]
    assert {float(state["step"]) for state in generator_adam["state"].values()} == {8.0}
    assert {float(state["step"]) for state in discriminator_adam["state"].values()} == {7.0}  # one update dropped
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())  # buffers included


def test_rollback_restores_the_last_checkpoint_and_lowers_the_learning_rate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_config(*FAST, "divergence.inject.step=5", "divergence.action=rollback",
                         "callbacks.last_checkpoint.every_n_train_steps=4", run_dir=run_dir))
    (event,) = events(run_dir)
    assert event["action"] == "rollback" and event["step"] == 5
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    lrs = [group["lr"] for opt in checkpoint["optimizer_states"] for group in opt["param_groups"]]
    assert lrs == pytest.approx([2e-4 * 0.5] * 2)


def test_all_ddp_ranks_take_the_same_decision(tmp_path: Path, home: Path) -> None:
    """The batch is poisoned on rank 0 only; rank 1 must still skip the same update."""
    run_dir = tmp_path / "run"
    result = run_cli(*FAST, "trainer=ddp_cpu", "divergence.inject.step=2", "divergence.inject.rank=0",
                     "divergence.action=skip", f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = ("step", "detector", "action", "global_step")
    rank0, rank1 = ([{k: e[k] for k in keys} for e in events(run_dir, rank)] for rank in (0, 1))
    assert rank0 == rank1 and rank0[0]["step"] == 2 and rank0[0]["action"] == "skip"


def test_spike_detector_stays_quiet_on_a_noisy_healthy_curve_and_catches_a_spike() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(3000)
    healthy = (2.0 * np.exp(-steps / 800) + 0.3) * rng.lognormal(0.0, 0.08, steps.size)
    detector = RollingZScore(window=200, warmup=50, threshold=6.0)
    assert [i for i, v in enumerate(healthy) if detector.update(float(v)) is not None] == []
    spiky = healthy.copy()
    spiky[2000] *= 4.0
    detector = RollingZScore(window=200, warmup=50, threshold=6.0)
    assert [i for i, v in enumerate(spiky) if detector.update(float(v)) is not None] == [2000]
    assert detector.update(float("nan")) is None  # non-finite is the other detector's business


def test_a_lasting_change_of_level_stops_alarming_after_patience() -> None:
    detector = RollingZScore(window=50, warmup=10, threshold=6.0, patience=5)
    series = [1.0 + 0.01 * (i % 7) for i in range(100)] + [5.0 + 0.01 * (i % 7) for i in range(200)]
    flags = [i for i, v in enumerate(series) if detector.update(v) is not None]
    assert flags[0] == 100 and len(flags) < 15  # the new level becomes the normal one


def test_collapse_needs_the_discriminator_to_win_for_k_steps() -> None:
    detector = CollapseDetector(steps=3)
    assert not detector.update(0.005, 0.999, 0.001) and not detector.update(0.005, 0.999, 0.001)
    assert not detector.update(0.7, 0.6, 0.4)  # a healthy step breaks the streak
    assert [detector.update(0.001, 0.999, 0.001) for _ in range(3)] == [False, False, True]


def test_lr_find_sweeps_plots_and_suggests(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    train(compose_config(*FAST, "mode=lr_find", "lr_find.num_steps=12", "lr_find.min_lr=1e-6",
                         "lr_find.max_lr=1e-1", "++trainer.limit_train_batches=null", run_dir=run_dir))
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert 3 <= len(result["lr"]) <= 12 and result["lr"] == sorted(result["lr"])
    assert result["suggested_lr"] and 1e-6 <= result["suggested_lr"] <= 1e-1
    assert (run_dir / "lr_find.png").stat().st_size > 1000
    assert "lr_find suggests lr=" in capsys.readouterr().out
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # a sweep leaves nothing to resume


class TinyClassifier(L.LightningModule):
    def __init__(self, bias: float):
        super().__init__()
        self.net = torch.nn.Linear(16, 10)
        torch.nn.init.normal_(self.net.weight, std=0.01)
        torch.nn.init.zeros_(self.net.bias)
        self.net.bias.data[0] = bias

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("bias,warns", [(0.0, False), (10.0, True)])
def test_initial_loss_check(bias: float, warns: bool, tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 10, (64,)))
    check = InitialLossCheck(num_classes=10)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[check], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="initial loss") if warns else _no_warning("initial loss"):
        trainer.fit(TinyClassifier(bias), torch.utils.data.DataLoader(data, batch_size=32))
    assert check.first_loss == pytest.approx(math.log(10), rel=0.05) or warns


class _no_warning:
    def __init__(self, text: str):
        self.text = text

    def __enter__(self):
        import warnings

        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        assert not [w for w in self.caught if self.text in str(w.message)]


class DoubledBackward(torch.autograd.Function):
    """tanh with a backward that is off by a factor of two: the bug a gradient check exists for."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return 2 * grad * (1 - y * y)


class CustomLayer(torch.nn.Module):
    def __init__(self, broken: bool):
        super().__init__()
        self.linear, self.broken = torch.nn.Linear(4, 3), broken

    def forward(self, x):
        h = self.linear(x)
        return DoubledBackward.apply(h) if self.broken else torch.tanh(h)


def test_gradient_check_grades_a_correct_and_a_broken_layer() -> None:
    x = (torch.randn(5, 4),)
    good = gradient_check(CustomLayer(broken=False), x)
    assert all(r.verdict == "good" for r in good), good
    bad = gradient_check(CustomLayer(broken=True), x)
    assert {r.verdict for r in bad} == {"wrong"}


def test_a_bundle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "payload": Exploit()}, tmp_path / "bundle.pt")
    with pytest.raises(UserError, match="corrupt or unsafe"):
        load_bundle(tmp_path)
