"""DiLoCo (distributed.sync=diloco, H=50) against all-reduce on Ray workers: bytes each worker sends, wall
time with the link between nodes modelled at 1 and 10 Gbit/s, and the final metric.

Each run is `python -m trainer +exp=<exp> launcher=ray ...` as a user runs it, both modes in the same
session on the same machine. Bytes are counted by the run itself (`comm/bytes`: what one worker put into
all-reduces of gradients or parameters; the guard's few scalars per step are left out). A ring all-reduce
of B bytes over N workers sends 2 (N - 1) / N * B per worker over its link; that time is added to the
measured wall time, in which the workers share this one machine and their "link" costs next to nothing.
Validation runs once, at the end (`val_every` below): every validation is also a sync, so frequent ones
would sync more often than every H steps.

With `--equal-steps`, each exp's epochs grow with the workers (x workers / 2), so that every worker takes as
many optimizer steps as at 2 workers: DiLoCo's own protocol (a fixed number of inner steps per worker),
against all-reduce over the same epochs. `--epochs-times K` multiplies every exp's epochs by K: runs long
enough for DiLoCo's outer optimizer to take more than a few steps.

    python scripts/bench_sync.py [--exps detector qa] [--workers 2 4] [--sync-every 50] [--equal-steps]
                                 [--epochs-times K] [--out DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import heading

REPO = Path(__file__).resolve().parent.parent
METRIC = {"detector": "val/AP50", "qa": "val/f1"}
EPOCHS = {"detector": 12, "qa": 1}  # as conf/exp sets them
LINKS_GBIT = (1, 10)


def run(exp: str, workers: int, sync: list[str], epochs: int, out: Path) -> dict[str, Any]:
    run_dir = out / f"{exp}-{workers}w-{epochs}ep-{'-'.join(s.split('=')[1] for s in sync)}"
    args = [
        f"+exp={exp}",
        "launcher=ray",
        f"launcher.num_workers={workers}",
        f"launcher.resources_per_worker.CPU={2 / workers}",  # oversubscribed on a 2-core machine
        *sync,
        f"++trainer.max_epochs={epochs}",
        f"++trainer.check_val_every_n_epoch={epochs}",  # validation once, at the end
        "++trainer.val_check_interval=1.0",
        "logger=csv",
        "++trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{done.stderr[-3000:]}")
    return {"exp": exp, "workers": workers, "sync": " ".join(sync), **measure(run_dir, exp, workers, seconds)}


def measure(run_dir: Path, exp: str, workers: int, seconds: float) -> dict[str, Any]:
    """The final metric, and the bytes and outer steps of the whole run from its last checkpoint (the
    logged `comm/bytes` stops at the last logging step, before the final sync)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    sync = state["callbacks"]["WorkerSync"]
    on_the_link = 2 * (workers - 1) / workers * sync["bytes_sent"]
    return {
        "metric": METRIC[exp],
        "final": metrics[METRIC[exp]]["final"],
        "bytes": sync["bytes_sent"],
        "link_bytes": on_the_link,
        "steps": state["global_step"],
        "outer_steps": sync.get("outer_steps"),
        "wall_s": seconds,
        **{f"wall_s_{g}gbit": seconds + on_the_link * 8 / (g * 1e9) for g in LINKS_GBIT},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exps", nargs="+", default=["detector", "qa"], choices=sorted(METRIC))
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--sync-every", type=int, default=50)
    parser.add_argument("--equal-steps", action="store_true", help="epochs x workers / 2")
    parser.add_argument("--epochs-times", type=int, default=1, help="every exp's epochs x K")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_sync")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    modes = {
        "allreduce": ["distributed.sync=allreduce"],
        "diloco": ["distributed.sync=diloco", f"distributed.sync_every={args.sync_every}"],
    }
    rows = []
    title = f"DiLoCo (H={args.sync_every}) against all-reduce on Ray workers"
    if args.equal_steps or args.epochs_times != 1:
        title += f", epochs x {args.epochs_times}" + (" x workers / 2" if args.equal_steps else "")
    print(heading(title))
    print(TABLE_HEADER, flush=True)
    for exp in args.exps:
        for workers in args.workers:
            epochs = EPOCHS[exp] * args.epochs_times
            epochs = epochs * workers // 2 if args.equal_steps else epochs
            pair = {name: run(exp, workers, sync, epochs, args.out) for name, sync in modes.items()}
            rows.append(pair)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
            print(table_row(pair["allreduce"], pair["diloco"]), flush=True)


TABLE_HEADER = (
    "| exp | workers | outer steps | final metric: all-reduce -> DiLoCo | bytes per worker | wall time here |"
    + " "
    + " | ".join(f"at {g} Gbit/s" for g in LINKS_GBIT)
    + " |\n"
    + "|---" * (6 + len(LINKS_GBIT))
    + "|"
)


def table_row(base: dict[str, Any], local: dict[str, Any]) -> str:
    """exp | workers | outer steps | metric: all-reduce -> DiLoCo | bytes per worker | wall time: here, 1,
    10 Gbit/s"""
    keys = ("wall_s", *(f"wall_s_{g}gbit" for g in LINKS_GBIT))
    walls = [f"{base[key]:.0f} -> {local[key]:.0f} s" for key in keys]
    less = base["bytes"] / local["bytes"]
    cells = [
        base["exp"],
        str(base["workers"]),
        str(local["outer_steps"]),
        f"{base['metric']} {base['final']:.4f} -> {local['final']:.4f} "
        f"({(local['final'] / base['final'] - 1) * 100:+.1f}%)",
        f"{base['bytes'] / 2**20:.1f} -> {local['bytes'] / 2**20:.2f} MiB ({less:.0f}x less)",
        *walls,
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
