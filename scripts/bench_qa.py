"""Extractive QA: training throughput of `trainer` against a plain transformers loop, and F1 against time.

Throughput: both sides fine-tune MiniLM-L6 (a fresh copy from its package each round) on the same
tokenized windows of the embedded data set, batch 16, in this process, alternating rounds so that machine
noise hits both alike. The plain loop is what the transformers docs teach: a DataLoader with
DataCollatorWithPadding, torch's AdamW with a linear schedule, `model(**batch).loss.backward()`. The trainer
side runs `+exp=qa` with its full default stack (W&B offline, divergence guard, per-layer gradient norms,
metrics.json), validation off.

Accuracy (--accuracy): runs `python -m trainer +exp=qa` as a user would and reports wall time and the
validation EM/F1 of every epoch.

    python scripts/bench_qa.py [--rounds 3] [--steps 40] [--accuracy]
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

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from bench_common import heading, table
from bench_overhead import REPO, WARMUP, StepTimer, compose_config

from trainer.config.build import build
from trainer.models.qa import load_tokenizer, pretrained_qa_model
from trainer.run import train


def plain_loop(steps: int) -> list[float]:
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    cfg = compose_config("+exp=qa", run_dir=Path(tempfile.mkdtemp()))
    L.seed_everything(cfg.seed, verbose=False)
    data = build(cfg.data, "data")
    data.setup("fit")
    model = pretrained_qa_model(cfg.model.encoder.pretrained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.task.lr, weight_decay=cfg.task.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    loader = torch.utils.data.DataLoader(
        data.train_set,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=DataCollatorWithPadding(load_tokenizer("minilm")),
    )
    starts = []
    for batch, _ in zip(loader, range(steps)):
        starts.append(time.perf_counter())
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(starts)][WARMUP:]


def trainer_loop(steps: int) -> list[float]:
    cfg = compose_config(
        "+exp=qa",
        f"++trainer.max_steps={steps}",
        "++trainer.limit_val_batches=0",
        "++trainer.enable_progress_bar=false",
        f"+callbacks.timer._target_={__name__}.StepTimer",
        run_dir=Path(tempfile.mkdtemp()),
    )
    train(cfg)
    return StepTimer.instances[-1].step_times()


def accuracy_run() -> None:
    run_dir = Path(tempfile.mkdtemp()) / "qa"
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "+exp=qa",
            "logger=csv",
            "++trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rows = [line.split(",") for line in (run_dir / "csv" / "metrics.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    evaluations = [entry for entry in (dict(zip(header, row)) for row in rows) if entry.get("val/f1")]
    cells = {
        "step": [e["step"] for e in evaluations],
        "F1": [f"{float(e['val/f1']):.1f}" for e in evaluations],
        "EM": [f"{float(e['val/exact']):.1f}" for e in evaluations],
        "F1 answerable / unanswerable": [
            f"{float(e['val/f1_has_answer']):.1f} / {float(e['val/f1_no_answer']):.1f}" for e in evaluations
        ],
    }
    print(heading(f"`trainer +exp=qa`: validation against steps, {wall / 60:.1f} min from command to exit"))
    (header_row, *rows_out) = [[name, *values] for name, values in cells.items()]
    print(table(header_row, rows_out))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics["val/f1"]
    print(f"\nbest val/f1 {best['best']:.1f} at step {best['best_step']}; run dir {run_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--accuracy", action="store_true", help="time +exp=qa to its F1 instead")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.accuracy:
        accuracy_run()
        return
    plain, ours = [], []
    for _ in range(args.rounds):
        plain += plain_loop(args.steps)
        ours += trainer_loop(args.steps)
    batch, steps = 16, args.steps
    p, t = statistics.median(plain), statistics.median(ours)
    print(
        heading(
            f"QA against a plain transformers loop, MiniLM-L6, batch {batch}, {steps} steps x {args.rounds} "
            f"rounds, {torch.get_num_threads()} threads"
        )
    )
    rows = [
        ["plain transformers loop", f"{p * 1e3:.1f}", f"{batch / p:.1f}"],
        ["`trainer`, `+exp=qa`", f"{t * 1e3:.1f}", f"{batch / t:.1f}"],
        ["**throughput ratio trainer / plain**", "", f"**{p / t:.3f}** (target 1.0)"],
    ]
    print(table(["", "median ms/step", "examples/s"], rows))


if __name__ == "__main__":
    main()
