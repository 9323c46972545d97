"""The GPU path in one command: every exp trained on one GPU with `trainer=gpu`, timed, and its checkpoint and
divergence bundle carried back to CPU.

    python scripts/gpu_check.py                 # on a machine with a GPU: a few minutes
    python scripts/gpu_check.py --tiny          # on CPU: proves the script (tests/test_gpu_check.py)

For each exp (dcgan, detector, ppo, dqn, qa) it trains a fixed number of batches and reports batches/s,
items/s (images, env steps or tokens), peak GPU memory and the time from building the run to the end of
its first step (compilation included); then it resumes that run's last checkpoint on CPU for two batches.
A DCGAN run with a NaN injected at batch 3 halts, and its bundle is replayed on CPU. The guard and the
gradient monitor are timed on against off (target: at most 3%), and the `+exp=dcgan` networks at a GPU-sized
batch under `trainer` against the training loop of the PyTorch examples' DCGAN (fp32, eager, written here
the way that example writes it) in the same process (goal: at least 2x its images per second).

Loggers are off (`logger=none`: W&B is not needed to time a step) and runs use `launcher=local`. Prints one
table and writes it as JSON (--out). Exits non-zero when a check fails.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import TINY_DCGAN, compose_config  # noqa: E402

from trainer.config import build  # noqa: E402
from trainer.errors import DivergenceHalt  # noqa: E402
from trainer.replay import replay  # noqa: E402
from trainer.run import train  # noqa: E402

QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.limit_val_batches=0"]
CPU = ["trainer=cpu", "perf.compile=false", "perf.channels_last=false", "perf.matmul_precision=null"]
CPU_DATA = ["++data.num_workers=0", "++data.pin_memory=false"]

# exp -> (the exp at GPU size, the same tiny for --tiny); every run adds QUIET and the device's preset.
EXPS: dict[str, tuple[list[str], list[str]]] = {
    "dcgan": (["+exp=dcgan", "data.batch_size=256"], TINY_DCGAN[:5]),
    "detector": (
        ["+exp=detector"],
        ["+exp=detector", "data.canvases.train_images=16", "data.canvases.val_images=4", "data.batch_size=4"],
    ),
    "ppo": (
        ["+exp=ppo", "task.num_envs=64"],
        ["+exp=ppo", "task.env_steps_per_epoch=1024", "task.eval_episodes=1"],
    ),
    "dqn": (
        ["+exp=dqn", "task.learning_starts=0"],
        ["+exp=dqn", "task.learning_starts=0", "task.eval_episodes=1"],
    ),
    "qa": (
        ["+exp=qa", "data.batch_size=64"],
        [
            "+exp=qa",
            "data.max_length=64",
            "data.doc_stride=16",
            "data.batch_size=4",
            "data.facts.train_paragraphs=8",
        ],
    ),
}
UNITS = {"dcgan": "images", "detector": "images", "ppo": "env steps", "dqn": "env steps", "qa": "tokens"}


class Clock(L.Callback):
    """Batch start times, the items done before each batch, the end of the first step, and a stop after
    `batches` batches."""

    def __init__(self, batches: int) -> None:
        self.batches, self.built = batches, time.perf_counter()
        self.starts: list[float] = []
        self.done: list[float] = []  # items (images, tokens; env steps for RL) before each batch
        self.first_step_end: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        _sync()
        self.starts.append(time.perf_counter())
        before = self.done[-1] + self._last_batch if self.done else 0.0
        self.done.append(float(module.env_steps) if hasattr(module, "env_steps") else before)
        self._last_batch = items_in(batch)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.first_step_end is None:
            _sync()
            self.first_step_end = time.perf_counter() - self.built
        if len(self.starts) >= self.batches:
            trainer.should_stop = True

    def rates(self, warmup: int) -> tuple[float, float]:
        """(batches/s, items/s) from the start of batch `warmup` (after compilation and cold caches) to the
        start of the last batch."""
        if len(self.starts) < warmup + 2:
            return math.nan, math.nan
        seconds = self.starts[-1] - self.starts[warmup]
        return (len(self.starts) - 1 - warmup) / seconds, (self.done[-1] - self.done[warmup]) / seconds


def items_in(batch: Any) -> float:
    """Images in an image batch, tokens in a token batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch["input_ids"].numel() if "input_ids" in batch else 0
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch[0]) if isinstance(batch[0], (list, tuple)) else items_in(batch[0])
    return 0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(overrides: list[str], run_dir: Path, batches: int, **kwargs: Any) -> tuple[Clock, dict[str, Any]]:
    """One training run of `batches` batches, timed by a Clock that goes first among the callbacks."""
    clock = Clock(batches)
    metrics = train(
        compose_config(*overrides, *QUIET, run_dir=run_dir), prepare=lambda t: _with(t, clock), **kwargs
    )
    return clock, metrics


def _with(pl_trainer: L.Trainer, callback: L.Callback) -> L.Trainer:
    pl_trainer.callbacks.insert(0, callback)
    return pl_trainer


def check_exp(name: str, device: list[str], tiny: bool, batches: int, scratch: Path) -> dict[str, Any]:
    """Train on the device, then resume on CPU from the checkpoint the device wrote."""
    gpu_size, small = EXPS[name]
    overrides = [*(small if tiny else gpu_size), *device]
    run_dir = scratch / name
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        clock, _ = run(overrides, run_dir, batches)
    except Exception as e:  # one exp's failure is a row of the table, not the end of the check
        return {"exp": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    batches_per_s, items_per_s = clock.rates(warmup=min(3, batches // 3))
    row = {
        "exp": name,
        "batches_per_s": batches_per_s,
        "items_per_s": items_per_s,
        "unit": UNITS[name],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "first_step_s": clock.first_step_end,
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed_dir = scratch / f"{name}-cpu"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        step = state["global_step"]
        # Two more batches; max_epochs lifted, as a run stopped mid-epoch counts that epoch as done, and
        # max_steps within the length a one-cycle schedule was planned for (a longer run is refused).
        planned = [s["total_steps"] for s in state.get("lr_schedulers", []) if "total_steps" in s]
        resume = [
            *(small if tiny else gpu_size),
            *CPU,
            *CPU_DATA,
            "++trainer.max_epochs=1000",
            *([f"++trainer.max_steps={min(planned)}"] if planned else []),
        ]
        cpu_clock, _ = run(resume, resumed_dir, 2, ckpt_path=str(last))
        after = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        row["resumes_on_cpu"] = after > step and len(cpu_clock.starts) == 2
    except Exception as e:
        row["resumes_on_cpu"] = False
        row["error"] = f"resume on CPU: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


def check_bundle(device: list[str], tiny: bool, scratch: Path) -> dict[str, Any]:
    """A NaN batch at batch 3 halts the device run; its bundle replays on CPU and reproduces."""
    run_dir = scratch / "halt"
    overrides = [*(EXPS["dcgan"][1] if tiny else EXPS["dcgan"][0]), *device, "divergence.inject.step=3"]
    with contextlib.suppress(DivergenceHalt):
        run(overrides, run_dir, 10)
    bundles = sorted((run_dir / "divergence").glob("step*/bundle.pt"))
    if not bundles:
        return {"bundle_replays_on_cpu": False, "error": "no bundle written"}
    reproduced, _, _ = replay(str(bundles[0].parent), device="cpu")
    return {"bundle_replays_on_cpu": bool(reproduced)}


def check_guard(device: list[str], tiny: bool, rounds: int, batches: int, scratch: Path) -> dict[str, Any]:
    """Median step time with the guard and the gradient monitor on, over off; alternating runs."""
    base = [*(EXPS["dcgan"][1] if tiny else EXPS["dcgan"][0]), *device]
    off = ["divergence=off", "~callbacks.gradients"]
    on_times, off_times = [], []
    for r in range(rounds):
        for extra, times in (([], on_times), (off, off_times)):
            clock, _ = run([*base, *extra], scratch / f"guard-{r}-{len(extra)}", batches)
            starts = clock.starts[min(3, batches // 3) :]
            times += [b - a for a, b in itertools.pairwise(starts)]
    ratio = statistics.median(on_times) / statistics.median(off_times)
    return {"guard_and_monitor_over_off": ratio}


def examples_dcgan_images_per_s(batch_size: int, batches: int, device: torch.device) -> float:
    """The training loop of github.com/pytorch/examples dcgan/main.py, written the way it is written there
    (fp32, eager, BCE on D's output, one D step on real and fake, one G step), on the +exp=dcgan networks
    and data loader. D returns logits here, so the loss is BCEWithLogits: the example's Sigmoid + BCELoss."""
    cfg = compose_config(
        "+exp=dcgan", f"data.batch_size={batch_size}", *CPU_DATA, run_dir=Path(tempfile.mkdtemp())
    )
    data = build(cfg.data, "data")
    data.setup("fit")
    netG = build(cfg.model.generator, "g").to(device)
    netD = build(cfg.model.discriminator, "d").to(device)
    criterion = nn.BCEWithLogitsLoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, 0.999))
    real_label, fake_label = 1.0, 0.0
    starts, images = [], 0
    while len(starts) < batches:
        for data_batch in data.train_dataloader():
            _sync()
            starts.append(time.perf_counter())
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            real_cpu = data_batch.to(device)
            b_size = real_cpu.size(0)
            label = torch.full((b_size,), real_label, dtype=torch.float, device=device)
            output = netD(real_cpu).view(-1)
            errD_real = criterion(output, label)
            errD_real.backward()
            noise = torch.randn(b_size, netG.latent_dim, device=device)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach()).view(-1)
            errD_fake = criterion(output, label)
            errD_fake.backward()
            optimizerD.step()
            # (2) Update G network: maximize log(D(G(z)))
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake).view(-1)
            errG = criterion(output, label)
            errG.backward()
            optimizerG.step()
            images += b_size if len(starts) > 3 else 0
            if len(starts) >= batches:
                break
    _sync()
    return images / (time.perf_counter() - starts[3])


def check_baseline(device: list[str], tiny: bool, batches: int, scratch: Path) -> dict[str, Any]:
    batch_size = 16 if tiny else 256
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    example = examples_dcgan_images_per_s(batch_size, batches, target)
    base = EXPS["dcgan"][1] if tiny else EXPS["dcgan"][0]
    clock, _ = run([*base, f"data.batch_size={batch_size}", *device], scratch / "vs-example", batches)
    _, ours = clock.rates(warmup=3)
    return {
        "dcgan_images_per_s": ours,
        "examples_images_per_s": example,
        "dcgan_over_examples": ours / example,
    }


def table(rows: list[dict[str, Any]]) -> str:
    columns = f"{'batches/s':>11}{'items/s':>12}  {'unit':10}{'peak GiB':>9}{'1st step s':>11}"
    lines = [f"{'exp':10}{columns}  resumes on CPU"]
    for r in rows:
        if "batches_per_s" not in r:
            lines.append(f"{r['exp']:10}failed: {r['error']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        resumed = "yes" if r.get("resumes_on_cpu") else f"NO ({r.get('error', '')})"
        lines.append(
            f"{r['exp']:10}{r['batches_per_s']:11.2f}{r['items_per_s']:12.0f}  {r['unit']:10}{peak:>9}"
            f"{r['first_step_s']:11.1f}  {resumed}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: checks the script in seconds")
    parser.add_argument("--exps", default=",".join(EXPS), help="comma-separated subset of " + ",".join(EXPS))
    parser.add_argument("--batches", type=int, help="batches per timed run (default 40; --tiny 4)")
    parser.add_argument("--rounds", type=int, default=3, help="guard on/off rounds (--tiny: 1)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = ["trainer=gpu"] if on_gpu else [*CPU, *CPU_DATA]
    batches = args.batches or (4 if args.tiny else 40)
    rounds = 1 if args.tiny else args.rounds
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    started = time.time()
    rows = [check_exp(name, device, args.tiny, batches, scratch) for name in args.exps.split(",")]
    checks = {
        **check_bundle(device, args.tiny, scratch),
        **check_guard(device, args.tiny, rounds, max(batches, 8), scratch),
        **check_baseline(device, args.tiny, max(batches, 8), scratch),
    }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "batches": batches,
        "seconds": round(time.time() - started, 1),
        "exps": rows,
        **checks,
    }
    print(f"\n{report['device']}, torch {report['torch']}, lightning {report['lightning']}, {report['date']}")
    print(table(rows))
    print(f"bundle from the device replays on CPU: {'yes' if checks['bundle_replays_on_cpu'] else 'NO'}")
    print(f"guard + gradient monitor on / off, median step time: {checks['guard_and_monitor_over_off']:.3f}")
    print(
        f"+exp=dcgan under trainer {checks['dcgan_images_per_s']:.0f} images/s, the PyTorch examples' loop "
        f"{checks['examples_images_per_s']:.0f} images/s: {checks['dcgan_over_examples']:.2f}x"
    )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out} ({report['seconds']} s)")
    failed = [r["exp"] for r in rows if "error" in r] + (
        ["bundle"] if not checks["bundle_replays_on_cpu"] else []
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
