"""Per-step time of a 2-worker CPU run under Ray Train against Lightning's own DDP with 2 processes.

Both run `+exp=dcgan` (32x32 digits, batch 64 per process) through the real command line, one thread per
process (Ray gives each 1-CPU worker OMP_NUM_THREADS=1; the DDP run gets the same), alternating rounds.
Each reports the wall time between consecutive batch starts on rank 0, and the time from the command to
its first training step.

    python scripts/bench_ray.py [--rounds 3] [--epochs 4]

Target: median(Ray step) / median(DDP step) <= 1.05.
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import heading, table
from bench_overhead import bench_args, time_to_first_step

LAUNCHERS = {
    "Lightning DDP, 2 processes": ["trainer=ddp_cpu"],
    "Ray Train, 2 workers": ["launcher=ray", "launcher.num_workers=2"],
}


def run(launcher_args: list[str], epochs: int) -> tuple[list[float], float]:
    scratch = Path(tempfile.mkdtemp())
    command = [
        sys.executable,
        "-m",
        "trainer",
        "+exp=dcgan",
        *launcher_args,
        f"++trainer.max_epochs={epochs}",
        "++trainer.limit_val_batches=0",
        "++trainer.enable_progress_bar=false",
        "+callbacks.timer._target_=bench_overhead.StepTimer",
        "+callbacks.timer.print_first=true",
        f"+callbacks.timer.dump_to={scratch / 'steps.json'}",
        f"hydra.run.dir={scratch / 'run'}",
    ]
    first_step = time_to_first_step(command, OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return json.loads((scratch / "steps.json").read_text()), first_step


def main() -> None:
    args = bench_args(__doc__, rounds=3, epochs=4)
    steps: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    firsts: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    for _ in range(args.rounds):
        for name, launcher_args in LAUNCHERS.items():
            times, first = run(launcher_args, args.epochs)
            steps[name] += times
            firsts[name].append(first)
    rows = [
        [
            name,
            f"{statistics.median(steps[name]) * 1e3:.1f}",
            f"{statistics.mean(steps[name]) * 1e3:.1f}",
            len(steps[name]),
            f"{statistics.median(firsts[name]):.1f} s",
        ]
        for name in LAUNCHERS
    ]
    ddp, ray = (statistics.median(steps[name]) for name in LAUNCHERS)
    rows.append(["**ratio Ray / DDP**", f"**{ray / ddp:.3f}** (target 1.05)", "", "", ""])
    print(heading(f"Ray against Lightning DDP, `+exp=dcgan`, {args.rounds} rounds x {args.epochs} epochs"))
    print(table(["", "median ms/step", "mean ms/step", "steps", "command to first step"], rows))


if __name__ == "__main__":
    main()
