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
    print(f"\n{'':38}{'median ms/step':>16}{'mean ms/step':>14}{'steps':>7}")
    for name, times in steps.items():
        print(
            f"{name:38}{statistics.median(times) * 1e3:16.1f}"
            f"{statistics.mean(times) * 1e3:14.1f}{len(times):7d}"
        )
    off, on = (statistics.median(times) for times in steps.values())
    print(f"overhead on / off (median): {on / off:.3f}   (target <= 1.03)")


if __name__ == "__main__":
    main()
