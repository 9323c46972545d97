"""Detector: how soon `+exp=detector` reaches AP50 >= 0.8 on its validation split, on this machine.

Runs the experiment with its full default stack (W&B offline, divergence guard, gradient monitor,
checkpoints) and records after every validation the wall time since the command started (the digit
canvases are written once beforehand, as a first run on a machine does) and val/AP50, val/AP.

    python scripts/bench_detector.py [overrides ...]
"""

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import heading, table
from bench_overhead import compose_config

from trainer.run import train

TARGET = 0.8
STARTED = time.perf_counter()


class ValidationClock(L.Callback):
    """(seconds since the start, epoch, AP50, AP) after each validation."""

    rows: ClassVar[list[tuple[float, int, float, float]]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.rows.append(
            (
                time.perf_counter() - STARTED,
                trainer.current_epoch,
                float(metrics["val/AP50"]),
                float(metrics["val/AP"]),
            )
        )
        print(
            f"{self.rows[-1][0]:7.1f} s  epoch {trainer.current_epoch:2d}  AP50 {self.rows[-1][2]:.3f}  "
            f"AP {self.rows[-1][3]:.3f}",
            flush=True,
        )


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg = compose_config(
        "+exp=detector",
        "++trainer.enable_progress_bar=false",
        *sys.argv[1:],
        f"+callbacks.clock._target_={__name__}.ValidationClock",
        run_dir=Path(tempfile.mkdtemp()),
    )
    train(cfg)
    rows = ValidationClock.rows
    reached = next((row for row in rows if row[2] >= TARGET), None)
    best = max(rows, key=lambda row: row[2])
    print(heading("`+exp=detector`: time to AP50 " + str(TARGET)))
    print(
        table(
            ["epoch", "seconds since start", "val/AP50", "val/AP"],
            [[epoch, f"{seconds:.1f}", f"{ap50:.3f}", f"{ap:.3f}"] for seconds, epoch, ap50, ap in rows],
        )
    )
    print(
        f"\nAP50 >= {TARGET}: "
        + (f"after {reached[0]:.0f} s (epoch {reached[1]})" if reached else "not reached")
        + f"; best AP50 {best[2]:.3f} (AP {best[3]:.3f}) at {best[0]:.0f} s; "
        f"total {time.perf_counter() - STARTED:.0f} s"
    )


if __name__ == "__main__":
    main()
