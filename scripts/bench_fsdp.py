"""FSDP against DDP at 2 workers on the QA encoder (MiniLM-L6, 22.6 M parameters): memory per worker and
step time, each measured by `python -m trainer +exp=qa` as a user runs it, in turns.

Per worker, at the end of every step after the first (`StateMemory`, added to the run as a callback):
- training state: the bytes of the parameters, gradients and optimizer state this worker holds (counted
  tensor by tensor: under FSDP a worker holds its shard of each);
- peak RSS: the process's high-water mark (VmHWM) minus its resident size when training started, so that
  the libraries' and the data's memory, the same for both, is left out; on a CPU this is what the
  all-gathered parameters (FSDP) or the gradient buckets (DDP) and the activations really cost.
Step time: the median wall time of the steps after the first two.

    python scripts/bench_fsdp.py [--steps 12] [--rounds 2] [--device cpu|gpu]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from bench_common import heading, table

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"cpu": ("ddp_cpu", "fsdp_cpu"), "gpu": ("ddp", "fsdp")}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class StateMemory(L.Callback):
    """Writes <out>/rank<r>.json: training-state bytes, peak RSS growth and step times of this worker."""

    def __init__(self, out: str):
        self.out, self.times, self.state_bytes = Path(out), [], 0
        self._start_rss, self._step_started = 0, 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_rss = _rss_kib("VmRSS")

    def on_train_batch_start(self, *args: Any) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._step_started)
        tensors = [p for p in pl_module.parameters()] + [p.grad for p in pl_module.parameters()]
        for optimizer in trainer.optimizers:
            tensors += [v for state in optimizer.state.values() for v in state.values()]
        size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        self.state_bytes = max(self.state_bytes, size)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        result = {
            "state_mib": self.state_bytes / 2**20,
            "peak_rss_growth_mib": (_rss_kib("VmHWM") - self._start_rss) / 1024,
            "step_s": statistics.median(self.times[2:]),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def run(preset: str, steps: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'scripts'}:{REPO}", "WANDB_MODE": "disabled"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "+exp=qa",
            f"trainer={preset}",
            f"++trainer.max_steps={steps}",
            "++trainer.limit_val_batches=0",
            "++trainer.enable_progress_bar=false",
            "logger=none",
            "monitor.metric=null",
            "~callbacks.last_checkpoint",
            "+callbacks.memory._target_=bench_fsdp.StateMemory",
            f"+callbacks.memory.out={out}",
            f"hydra.run.dir={out / 'run'}",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the worst worker


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=PRESETS, default="cpu")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {preset: [] for preset in PRESETS[args.device]}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as scratch:
        for round_ in range(args.rounds):  # in turns, so that machine noise hits both alike
            for preset in results:
                results[preset].append(run(preset, args.steps, Path(scratch) / f"{preset}-{round_}"))
    ddp, fsdp = (
        {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} for rounds in results.values()
    )
    print(
        heading(
            f"FSDP against DDP, `+exp=qa`, 2 workers ({args.device}), {args.steps} steps, "
            f"median of {args.rounds} rounds, worst worker"
        )
    )
    rows = [
        [label, f"{ddp[key]:.1f} {unit}", f"{fsdp[key]:.1f} {unit}", f"{fsdp[key] / ddp[key]:.2f}"]
        for key, label, unit in (
            ("state_mib", "parameters + gradients + optimizer state", "MiB"),
            ("peak_rss_growth_mib", "peak RSS growth during training", "MiB"),
            ("step_s", "step time", "s"),
        )
    ]
    print(table(["per worker", "DDP", "FSDP", "FSDP / DDP"], rows))


if __name__ == "__main__":
    main()
