"""The end of a run in a few lines: how it ended, what it reached, and where everything is.

Rank zero writes it to <run dir>/summary.txt when training ends, however it ends; the CLI shows it (and
train.log keeps it). Everything but the outcome is read back from what the run wrote: metrics.json, the
best checkpoint, the divergence events and bundles, and the W&B run pointer.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.files import write_text_atomic

SUMMARY_FILE = "summary.txt"
Outcome = Literal[
    "finished",
    "stopped by the divergence guard",
    "diverged (the divergence guard's verdict)",
    "preempted",
    "interrupted",
    "failed",
]
MAX_LOSSES = 6  # more than this many loss terms would bury the monitored metric


@dataclass
class RunEnd:
    outcome: Outcome
    seconds: float
    steps: int  # optimizer steps (a GAN's two optimizers make two per batch)
    epochs: int
    detail: str = ""  # why a run stopped or failed
    wandb_url: str | None = None  # an online run's page


def write_summary(run_dir: Path, end: RunEnd, monitored: str | None) -> str:
    text = render_summary(run_dir, end, monitored)
    write_text_atomic(run_dir / SUMMARY_FILE, text + "\n")
    return text


def render_summary(run_dir: Path, end: RunEnd, monitored: str | None) -> str:
    steps, epochs = _count(end.steps, "step"), _count(end.epochs, "epoch")
    headline = f"{end.outcome} in {duration(end.seconds)}: {steps}, {epochs}"
    if end.detail:
        headline += f"\n  {end.detail}"
    rows: list[tuple[str, str | None]] = list(
        metric_rows(_read_json(run_dir / "metrics.json") or {}, monitored)
    )
    rows.append(("best checkpoint", best_checkpoint(run_dir)))
    rows += divergence_rows(run_dir)
    rows.append(("W&B", wandb_line(run_dir, end.wandb_url)))
    rows.append(("run dir", str(run_dir)))
    width = max(len(name) for name, value in rows if value)
    body = [f"  {name:<{width}}  {value}" for name, value in rows if value]
    return "\n".join([f"── run {headline}", *body])


def metric_rows(metrics: dict[str, dict], monitored: str | None) -> list[tuple[str, str]]:
    """The monitored metric first, then every other validation metric, then the losses: final and best
    values (final only for a metric without a direction)."""
    others = sorted(name for name in metrics if name != monitored)
    validation = [name for name in others if is_validation_metric(name)]
    losses = [name for name in others if "loss" in name.rsplit("/", 1)[-1] and name not in validation]
    rows = []
    for name in ([monitored] if monitored in metrics else []) + validation + losses[:MAX_LOSSES]:
        entry = metrics[name]
        value = f"final {_num(entry['final'])}"
        if "best" in entry:
            value += f", best {_num(entry['best'])} at step {entry['best_step']}"
        elif entry.get("mode") is not None:
            value += ", never finite"
        rows.append((f"{name} (monitored)" if name == monitored else name, value))
    return rows


def is_validation_metric(name: str) -> bool:
    """`val/accuracy`, `val_loss`, `validation/f1`."""
    return re.split(r"[^A-Za-z0-9]+", name)[0].lower() in ("val", "valid", "validation")


def best_checkpoint(run_dir: Path) -> str | None:
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def divergence_rows(run_dir: Path) -> list[tuple[str, str]]:
    """How many events the guard recorded, the first of them, and the command that replays it."""
    events_file = run_dir / "divergence" / "events-rank0.jsonl"
    lines = events_file.read_text().splitlines() if events_file.is_file() else []
    events = [json.loads(line) for line in lines if line.strip()]
    if not events:
        return [("divergence", "no events")]
    first = events[0]
    rows = [
        (
            "divergence",
            f"{_count(len(events), 'event')}; the first at step {first['step']}: {first['reason']}",
        )
    ]
    bundles = sorted(
        {e["bundle"] for e in events if e.get("bundle") and (Path(e["bundle"]) / "bundle.pt").is_file()}
    )
    if bundles:
        rows.append(
            (
                "replay",
                f"python -m trainer.replay {bundles[0]}  ({_count(len(bundles), 'bundle')})",
            )
        )
    return rows


def wandb_line(run_dir: Path, url: str | None) -> str | None:
    pointer = _read_json(run_dir / "wandb_run.json")
    if not pointer or pointer.get("mode") == "disabled":
        return None
    if url:
        return url
    if pointer.get("mode") == "offline":
        runs = sorted(Path(pointer["dir"]).glob(f"offline-run-*-{pointer['id']}"))
        target = runs[-1] if runs else Path(pointer["dir"])
        return f"offline; upload with: wandb sync {target}"
    return f"run {pointer['id']} in project {pointer['project']}"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _num(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
