"""Per-step overhead of `trainer` against a hand-written PyTorch loop, and time from command to first step.

Both sides train the same DCGAN (exp=dcgan: 32x32 digits, widths 32, batch 64) on the same data loader for
the same number of batches, in this process, alternating rounds so that machine noise hits both alike.
The trainer side runs the full default stack: W&B (offline) with per-layer gradient norms and histograms at
their default frequency, metrics.json, checkpoints every epoch, the sample grid.

    python scripts/bench_overhead.py [--rounds 3] [--epochs 3]

Prints a table and the ratio median(trainer step) / median(plain step); target <= 1.03.
"""

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_common import heading, table  # noqa: E402
from helpers import compose_config  # noqa: E402

from trainer.config.build import build  # noqa: E402
from trainer.run import train  # noqa: E402

WARMUP = 5


class StepTimer(L.Callback):
    """Wall time between consecutive batch starts: the step and everything the loop does around it."""

    instances: ClassVar[list["StepTimer"]] = []

    def __init__(self, print_first: bool = False, dump_to: str | None = None) -> None:
        self.starts: list[float] = []
        self.print_first = print_first
        self.dump_to = dump_to  # rank 0 writes its step times here as JSON when training ends
        StepTimer.instances.append(self)

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())
        if self.print_first and len(self.starts) == 1:
            print(f"FIRST_STEP_AT {time.time():.6f}", flush=True)

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][WARMUP:]

    def on_train_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.dump_to and trainer.is_global_zero:
            Path(self.dump_to).write_text(json.dumps(self.step_times()))


def plain_loop(epochs: int) -> list[float]:
    """The DCGAN step written by hand: same networks, optimizers, data loader and batch order."""
    cfg = compose_config("+exp=dcgan", run_dir=Path(tempfile.mkdtemp()))
    L.seed_everything(cfg.seed, verbose=False)
    data = build(cfg.data, "data")
    data.setup("fit")
    g, d = build(cfg.model.generator, "g"), build(cfg.model.discriminator, "d")
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, cfg.task.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, cfg.task.beta2))
    loader = data.train_dataloader()
    starts = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for real in loader:
            starts.append(time.perf_counter())
            fake = g(torch.randn(real.shape[0], g.latent_dim))
            d_real, d_fake = d(real), d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + (
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_fake_for_g = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(d_fake_for_g, torch.ones_like(d_fake_for_g))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
    return [b - a for a, b in itertools.pairwise(starts)][WARMUP:]


def trainer_loop(epochs: int, *overrides: str) -> list[float]:
    run_dir = Path(tempfile.mkdtemp())
    cfg = compose_config(
        "+exp=dcgan",
        f"++trainer.max_epochs={epochs}",
        "++trainer.enable_progress_bar=false",
        "++trainer.limit_val_batches=0",
        f"+callbacks.timer._target_={__name__}.StepTimer",
        *overrides,
        run_dir=run_dir,
    )
    train(cfg)
    return StepTimer.instances[-1].step_times()


def time_to_first_step(command: list[str], **env: str) -> float:
    """Seconds from starting `command` to its first training step (a StepTimer with print_first=true)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}:{REPO / 'scripts'}",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **env,
    }
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    stamps = re.findall(r"FIRST_STEP_AT ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or not stamps:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return float(stamps[0]) - started


def bench_args(doc: str, rounds: int = 3, epochs: int = 3) -> argparse.Namespace:
    """--rounds and --epochs for a benchmark; W&B offline and quiet."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epochs", type=int, default=epochs)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return parser.parse_args()


def main() -> None:
    args = bench_args(__doc__)
    plain, ours = [], []
    for _ in range(args.rounds):
        plain += plain_loop(args.epochs)
        ours += trainer_loop(args.epochs)
    p, t = statistics.median(plain), statistics.median(ours)
    rows = [
        ["hand-written PyTorch loop", f"{p * 1e3:.1f}", f"{statistics.mean(plain) * 1e3:.1f}", len(plain)],
        ["`trainer`, `+exp=dcgan`, W&B", f"{t * 1e3:.1f}", f"{statistics.mean(ours) * 1e3:.1f}", len(ours)],
        [
            "**ratio**",
            f"**{t / p:.3f}** (target 1.03)",
            f"{statistics.mean(ours) / statistics.mean(plain):.3f}",
            "",
        ],
    ]
    print(
        heading(
            f"Overhead, `+exp=dcgan`, {args.rounds} rounds x {args.epochs} epochs, "
            f"{torch.get_num_threads()} threads"
        )
    )
    print(table(["", "median ms/step", "mean ms/step", "steps"], rows))

    first_trainer = time_to_first_step(
        [
            sys.executable,
            "-m",
            "trainer",
            "+exp=dcgan",
            "++trainer.max_steps=2",
            "++trainer.enable_progress_bar=false",
            "+callbacks.timer._target_=bench_overhead.StepTimer",
            "+callbacks.timer.print_first=true",
            f"hydra.run.dir={tempfile.mkdtemp()}",
        ]
    )
    first_plain = time_to_first_step([sys.executable, "-c", PLAIN_FIRST_STEP])
    print(
        f"time from command to first training step: trainer {first_trainer:.1f} s; "
        f"a bare script (import torch, load digits, build the networks) {first_plain:.1f} s"
    )


PLAIN_FIRST_STEP = """
import time, torch
from sklearn.datasets import load_digits
from trainer.models.dcgan import Generator, Discriminator
x = torch.tensor(load_digits().images[:64], dtype=torch.float32)
g, d = Generator(100, 32, 1, 32), Discriminator(32, 1, 32)
print(f"FIRST_STEP_AT {time.time():.6f}", flush=True)
"""

if __name__ == "__main__":
    main()
