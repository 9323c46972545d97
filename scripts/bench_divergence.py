"""Cost of divergence monitoring and the guard: `+exp=dcgan` with both at their defaults against both off.

Monitoring = per-layer gradient norms, weight norms, update ratios (every 50 steps) and histograms (every
500); the guard = non-finite, spike and collapse checks on every step. Same process, alternating rounds,
W&B offline.

    python scripts/bench_divergence.py [--rounds 3] [--epochs 3]

Target: median step time with both on / both off <= 1.03.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import heading, table
from bench_overhead import bench_args, trainer_loop

SETUPS = {
    "monitoring and guard off": ["divergence=off", "~callbacks.gradients"],
    "monitoring and guard on (defaults)": [],
}


def main() -> None:
    args = bench_args(__doc__)
    steps: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(args.rounds):
        for name, overrides in SETUPS.items():
            steps[name] += trainer_loop(args.epochs, *overrides)
    off, on = (statistics.median(times) for times in steps.values())
    rows = [
        [name, f"{statistics.median(t) * 1e3:.1f}", f"{statistics.mean(t) * 1e3:.1f}", len(t)]
        for name, t in steps.items()
    ]
    rows.append(["**ratio on / off**", f"**{on / off:.3f}** (target 1.03)", "", ""])
    print(heading(f"Guard and gradient monitor, `+exp=dcgan`, {args.rounds} rounds x {args.epochs} epochs"))
    print(table(["", "median ms/step", "mean ms/step", "steps"], rows))


if __name__ == "__main__":
    main()
