"""The divergence zoo: does the guard stay silent on healthy runs, and catch real divergences early?

    python scripts/bench_guard.py [--out DIR] [--parts healthy zoo actions] [--only NAME ...] [--reuse]

1. Healthy runs: every exp at its defaults (QA shortened), seeds 1, 2 and 3, with the guard at its defaults:
   reports (warnings with a bundle and a picture), bundles, and actions per run.
2. The zoo: configurations that diverge by themselves on this machine (no fault is injected, but for one
   drill: a single step at a huge learning rate), each from its own cause. The guard runs with `action=warn`
   (non-finite values still halt: the run is over there anyway) and `record=true`, so every watched number of
   every step is in divergence/series.jsonl. The failure step is the first non-finite number, or else the
   first validation from which the metric stays collapsed (below half of the healthy runs' median for a metric
   to maximise, above twice it for one to minimise). A detector's lead time is the failure step minus its
   first alarm; a detector that alarms on healthy runs is marked with its false alarms, since an alarm on
   every run has a lead time that means nothing.
3. Side by side, on the same recorded series: Lightning's `SpikeDetection` callback at its defaults, the
   rule of LLM Foundry's `KillLossSpike` (at its defaults) and ZClip's z-score test (at its defaults), each
   written from its public description except Lightning's, whose own class is fed the values. The loss
   anchors see the sum of the task's losses (what a callback reading the step's one loss sees); ZClip sees
   each network's gradient norm at each optimizer step.
4. Actions: each zoo case again with the guard's actions skip, rollback and clip (adaptive clipping of
   gradient spikes, with non-finite updates skipped): does the run finish with finite weights, and what
   fraction of the healthy runs' metric does it reach?

Runs go to --out (default outputs/bench_guard); --reuse reads the runs already there instead of training.
Prints the tables in Markdown (they go into docs/benchmarks.md as they are) and writes them to
<out>/results.json.
--fixtures copies the recorded series (gzipped) with what was measured of each run to tests/data/guard,
where tests/test_guard_zoo.py runs the guard's detectors over them.
"""

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tests"))

from bench_common import heading  # noqa: E402
from helpers import divergence_settings  # noqa: E402

from trainer.divergence.detectors import SeriesWatch  # noqa: E402
from trainer.divergence.series import Record, read_record  # noqa: E402

SEEDS = (1, 2, 3)
QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]

# What each exp is judged by, and the overrides of its healthy run (QA shortened to 200 steps).
EXPS: dict[str, dict[str, Any]] = {
    "dcgan": {"metric": "val/pixel_fd", "mode": "min", "overrides": []},
    "detector": {"metric": "val/AP50", "mode": "max", "overrides": []},
    "ppo": {"metric": "val/return", "mode": "max", "overrides": []},
    "dqn": {"metric": "val/return", "mode": "max", "overrides": []},
    "qa": {
        "metric": "val/f1",
        "mode": "max",
        "overrides": ["++trainer.max_steps=200", "++trainer.val_check_interval=50"],
    },
}


@dataclass
class Case:
    name: str
    exp: str
    cause: str
    overrides: list[str]


# Runs that diverge by themselves on this machine (found by trying; no NaN came out of any: Adam's normalised
# steps, BatchNorm/LayerNorm and losses on logits keep every failure finite here), and one drill: a single
# step at a huge learning rate, which no healthy run survives.
ZOO = [
    Case(
        "dcgan-lr",
        "dcgan",
        "GAN learning rate 200x too high, beta1 0.9: the discriminator wins, the samples collapse",
        ["task.lr=0.04", "task.beta1=0.9", "trainer.max_epochs=10"],
    ),
    Case(
        "dcgan-never-learns",
        "dcgan",
        "GAN learning rate 5x too high, beta1 0.9: the discriminator wins for most of the run, the generator"
        " never draws digits",
        ["task.lr=1e-3", "task.beta1=0.9"],
    ),
    Case(
        "dcgan-strong-d",
        "dcgan",
        "discriminator 8x wider than the generator: it overpowers it from the start",
        ["model.discriminator.width=64", "model.generator.width=8", "trainer.max_epochs=12"],
    ),
    Case(
        "detector-lr",
        "detector",
        "detector warmed up into a learning rate 150x too high: one exploding step, then a dead network",
        ["task.lr=0.3", "task.warmup_ratio=0.5", "trainer.max_epochs=3"],
    ),
    Case(
        "ppo-lr",
        "ppo",
        "PPO at a learning rate 200x too high, not annealed: the policy turns deterministic",
        [
            "task.lr=0.05",
            "task.anneal_lr=false",
            "task.total_env_steps=102400",
            "task.env_steps_per_epoch=5120",
        ],
    ),
    Case(
        "ppo-no-clip",
        "ppo",
        "PPO at a high learning rate without gradient clipping: one huge update kills the policy",
        [
            "task.lr=0.05",
            "task.max_grad_norm=1e9",
            "task.anneal_lr=false",
            "task.total_env_steps=102400",
            "task.env_steps_per_epoch=5120",
        ],
    ),
    Case(
        "dqn-lr",
        "dqn",
        "DQN at a learning rate 2000x too high: the Q-values blow up",
        ["task.lr=0.5", "task.total_env_steps=150000"],
    ),
    Case(
        "dqn-huge-step",
        "dqn",
        "DQN after one step at a learning rate a million times too high (the drill divergence.inject "
        "kind=huge_lr): its weights and Q-values blow up and never come back",
        ["divergence.inject.step=30", "divergence.inject.kind=huge_lr"],
    ),
]

ACTIONS = {
    "skip": ["divergence.action=skip", "divergence.spike.action=skip", "divergence.collapse.action=skip"],
    "rollback": [
        "divergence.action=rollback",
        "divergence.spike.action=rollback",
        "divergence.collapse.action=rollback",
    ],
    "clip": ["divergence.action=skip", "divergence.spike.action=clip", "divergence.collapse.action=warn"],
}


# -- running ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    exit_code: int
    seconds: float
    record: Record
    events: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def run(out: Path, name: str, exp: str, overrides: list[str], reuse: bool) -> Run:
    run_dir = out / name
    done = run_dir / "bench.json"
    if not (reuse and done.is_file()):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        command = [
            sys.executable,
            "-m",
            "trainer",
            f"+exp={exp}",
            *QUIET,
            "divergence.record=true",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ]
        started = time.perf_counter()
        result = subprocess.run(
            command,
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        seconds = time.perf_counter() - started
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "console.txt").write_text(result.stdout + result.stderr)
        done.write_text(json.dumps({"exit_code": result.returncode, "seconds": seconds, "command": command}))
        print(f"  {name}: exit {result.returncode} in {seconds:.0f} s", flush=True)
    info = json.loads(done.read_text())
    events = run_dir / "divergence" / "events-rank0.jsonl"
    metrics = run_dir / "metrics.json"
    return Run(
        name,
        info["exit_code"],
        info["seconds"],
        read_record(run_dir / "divergence" / "series.jsonl"),
        [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else [],
        json.loads(metrics.read_text()) if metrics.is_file() else {},
    )


# -- the anchors, on recorded series ---------------------------------------------------------------------


def lightning_spike_detection(losses: list[float], batch_indices: list[int]) -> list[int]:
    """Indices where Lightning's own `SpikeDetection` (defaults: running mean of 10, relative tolerance 2,
    non-finite counts) would raise; its decision methods are fed the values its callback would see."""
    import torch
    from lightning.pytorch.callbacks import SpikeDetection

    detector, alarms = SpikeDetection(), []
    for i, (loss, batch_idx) in enumerate(zip(losses, batch_indices)):
        value = torch.tensor(loss)
        if batch_idx >= detector.warmup and detector._is_spike(value):
            alarms.append(i)
        elif math.isfinite(loss):
            detector._update_stats(value)
    return alarms


def kill_loss_spike(
    losses: list[float], window: int = 100, multiplier: float = 2.0, patience: int = 4, loss_cap: float = 10.0
) -> list[int]:
    """LLM Foundry's `KillLossSpike` rule: with a full window of recent losses, a loss at least `multiplier`
    times their mean is an outlier, and more than `patience` outliers in a row are a spike; or, after two
    windows, half the window above `loss_cap` is a run of high losses."""
    recent: deque[float] = deque(maxlen=window)
    alarms, outliers = [], 0
    for i, loss in enumerate(losses):
        if len(recent) == window:
            outliers = outliers + 1 if loss >= multiplier * statistics.fmean(recent) else 0  # (NaN: never)
            high = i >= 2 * window and sum(v > loss_cap for v in recent) >= window / 2
            if outliers > patience or high:
                alarms.append(i)
        recent.append(loss)
    return alarms


def zclip(norms: list[float], alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25) -> list[int]:
    """ZClip's test: exponential moving mean and variance of the gradient norm (started from the first
    `warmup` norms); a norm more than `z_threshold` deviations above the mean is a spike (ZClip clips it,
    and moves its statistics with the clipped value)."""
    alarms: list[int] = []
    mean = var = None
    for i, norm in enumerate(norms):
        if not math.isfinite(norm):
            alarms.append(i)
            continue
        if mean is None:
            if i + 1 >= warmup:
                first = [n for n in norms[: i + 1] if math.isfinite(n)]
                mean, var = statistics.fmean(first), statistics.pvariance(first)
            continue
        std = math.sqrt(var)
        z = (norm - mean) / (std + 1e-6)
        if z > z_threshold:
            alarms.append(i)
            norm = mean + z_threshold * std / (z / z_threshold)  # what it clips to, and learns from
        mean = alpha * mean + (1 - alpha) * norm
        var = alpha * var + (1 - alpha) * (norm - mean) ** 2
    return alarms


# -- judging ---------------------------------------------------------------------------------------------


def metric_trajectory(run: Run, exp: str) -> list[tuple[int, float]]:
    key = EXPS[exp]["metric"]
    return [(step, values[key]) for step, values in run.record.validations if key in values]


def worse(value: float, than: float, mode: str) -> bool:
    """Worse than half of `than` for a metric to maximise, than twice it for one to minimise (or not
    finite)."""
    return not math.isfinite(value) or (value < 0.5 * than if mode == "max" else value > 2 * than)


def failure(run: Run, exp: str, healthy: list[Run]) -> tuple[str, int] | None:
    """Where a run failed: at its first non-finite number; else at the earlier of where its validation metric
    collapsed (fell to half its best so far, or rose to twice it for a metric to minimise) and the validation
    from which it stayed worse than half as good as the healthy runs at the same step (a run that never
    learned). None for a run that did not fail."""
    broken = [
        step.step
        for step in run.record.steps
        if not all(
            map(
                math.isfinite,
                [*step.values.values(), *(norm for norms in step.grad_norms.values() for norm in norms)],
            )
        )
    ]
    if broken:
        return "non-finite", min(broken)
    mode, trajectory = EXPS[exp]["mode"], metric_trajectory(run, exp)
    failures, best = [], None
    for step, value in trajectory:
        if best is not None and worse(value, best, mode):
            failures.append(("collapse", step))
            break
        best = value if best is None else (max if mode == "max" else min)(best, value)
    references = [metric_trajectory(h, exp) for h in healthy]
    behind = None
    for step, value in trajectory:
        at_step = statistics.median(
            next((v for s, v in reversed(ref) if s <= step), ref[0][1]) for ref in references
        )
        behind = (behind if behind is not None else step) if worse(value, at_step, mode) else None
    if behind is not None:
        failures.append(("behind healthy runs", behind))
    return min(failures, key=lambda failed: failed[1], default=None)


def anchor_alarms(run: Run) -> dict[str, list[int]]:
    """The steps at which each anchor alarms, on this run's recorded series."""
    steps = run.record.steps
    loss = [sum(step.values[name] for name in step.report.losses) for step in steps]
    networks = {network for step in steps for network in step.grad_norms}
    zclip_steps = {
        norms[i][0] for norms in map(run.record.grad_norms, networks) for i in zclip([v for _, v in norms])
    }
    return {
        "Lightning SpikeDetection": [
            steps[i].step for i in lightning_spike_detection(loss, [s.batch_idx for s in steps])
        ],
        "KillLossSpike": [steps[i].step for i in kill_loss_spike(loss)],
        "ZClip": sorted(zclip_steps),
    }


# -- the tables ------------------------------------------------------------------------------------------


def first_at_or_before(alarms: list[int], limit: int | None) -> int | None:
    return next((a for a in alarms if limit is None or a <= limit), None)


def our_alarms(run: Run) -> list[int]:
    return sorted(e["step"] for e in run.events)


def closest_call(run: Run, exp: str) -> str:
    """How near the guard's spike and level detectors came to alarming on a run: the largest score of a value
    above `min_ratio` times its median, and the largest level ratio, each against its threshold."""
    watch = SeriesWatch(*(divergence_settings(exp)[kind] for kind in ("spike", "level")))
    peaks = {"spike": (0.0, 0.0, ""), "level": (0.0, 0.0, "")}
    for step in run.record.steps:
        named = [(f"grad_norm/{n}", v, False) for n, norms in step.grad_norms.items() for v in norms]
        for series, value, loss in named + [(name, step.values[name], True) for name in step.report.losses]:
            spike = watch.detector("spike", series)
            if spike.enabled and spike.warm and value > 0 and math.isfinite(value):
                score, ratio = spike.score(value)
                if ratio > spike.min_ratio and score / spike.threshold > peaks["spike"][0] / max(
                    peaks["spike"][1], 1e-9
                ):
                    peaks["spike"] = (score, spike.threshold, series)
            watch.update(series, value, loss)
            level = watch.detector("level", series)
            if loss and level.enabled and len(level.recent) == level.window and level.seen >= level.warmup:
                ratio = statistics.median(level.recent) / level.best
                if ratio / level.ratio > peaks["level"][0] / max(peaks["level"][1], 1e-9):
                    peaks["level"] = (ratio, level.ratio, series)
    return ", ".join(
        f"{kind} {value:.3g} of {limit:g} ({series})"
        for kind, (value, limit, series) in peaks.items()
        if series
    )


def healthy_table(healthy: dict[str, list[Run]]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """One row per healthy run: the guard's reports, bundles and actions, how near it came to a report, and
    each anchor's alarms."""
    rows = [
        (
            "| run | wall s | final metric | reports | bundles | actions | "
            "closest call (score of threshold) | "
            "Lightning SpikeDetection | KillLossSpike | ZClip |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    false_alarms: dict[str, dict[str, int]] = {}
    for exp, runs in healthy.items():
        for seed, run in zip(SEEDS, runs):
            anchors = anchor_alarms(run)
            reports = [e for e in run.events if e["reported"]]
            actions = [e for e in run.events if e["action"] != "warn"]
            final = run.metrics.get(EXPS[exp]["metric"], {}).get("final", math.nan)
            rows.append(
                f"| {exp} seed {seed} | {run.seconds:.0f} | {final:.4g} | {len(reports)} | "
                f"{sum('bundle' in e for e in reports)} | {len(actions)} | {closest_call(run, exp)} | "
                + " | ".join(str(len(a)) for a in anchors.values())
                + " |"
            )
            counts = false_alarms.setdefault(exp, {"guard": 0, **{name: 0 for name in anchors}})
            counts["guard"] += bool(reports)
            for name, alarms in anchors.items():
                counts[name] += bool(alarms)
    return rows, false_alarms


def zoo_table(
    zoo: list[tuple[Case, Run]], healthy: dict[str, list[Run]], false_alarms: dict[str, dict[str, int]]
) -> list[str]:
    """One row per zoo case: its failure, and for each detector its first alarm's lead time before it."""
    rows = [
        "| case | cause | failure | guard | Lightning SpikeDetection | KillLossSpike | ZClip |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, run in zoo:
        failed = failure(run, case.exp, healthy[case.exp])
        limit = failed[1] if failed else None
        cells = []
        for name, alarms in {"guard": our_alarms(run), **anchor_alarms(run)}.items():
            first = first_at_or_before(alarms, limit) if failed else (alarms[0] if alarms else None)
            noisy = false_alarms.get(case.exp, {}).get(name, 0)
            lead = "missed" if first is None else (f"{limit - first} steps" if failed else f"step {first}")
            cells.append(lead + (f" ({noisy}/{len(SEEDS)} healthy runs alarmed)" if noisy else ""))
        failed_text = f"{failed[0]} at step {failed[1]}" if failed else "did not fail"
        rows.append(f"| {case.name} | {case.cause} | {failed_text} | " + " | ".join(cells) + " |")
    return rows


def healthy_level(runs: list[Run], exp: str) -> float:
    return statistics.median(run.metrics[EXPS[exp]["metric"]]["final"] for run in runs)


def outcome(run: Run, exp: str, level: float) -> str:
    """How the run ended, and its final metric (a halted run: its best) as a fraction of the healthy runs'."""
    fraction = (
        (lambda metric: metric / level) if EXPS[exp]["mode"] == "max" else (lambda metric: level / metric)
    )
    metric = run.metrics.get(EXPS[exp]["metric"], {}).get("final")
    if run.exit_code != 0 or metric is None or not math.isfinite(metric):
        halted = next((e for e in run.events if e["action"] == "halt"), None)
        best = max(
            (fraction(value) for _, value in metric_trajectory(run, exp) if math.isfinite(value)), default=0.0
        )
        return (
            f"halted at step {halted['step']} (best {best:.2f})"
            if halted
            else f"failed (exit {run.exit_code})"
        )
    return f"finished, {fraction(metric):.2f}"


def actions_table(rows_in: list[tuple[Case, dict[str, Run]]], levels: dict[str, float]) -> list[str]:
    rows = ["| case | no action (warn) | " + " | ".join(ACTIONS) + " |", "|---|---|" + "---|" * len(ACTIONS)]
    for case, runs in rows_in:
        rows.append(
            f"| {case.name} | "
            + " | ".join(outcome(runs[a], case.exp, levels[case.exp]) for a in ["warn", *ACTIONS])
            + " |"
        )
    return rows


def save_fixtures(out: Path, healthy: dict[str, list[Run]], zoo: list[tuple[Case, Run]]) -> None:
    """Each run's series.jsonl, gzipped, beside a JSON of its exp and (zoo) its cause and failure step."""
    folder = REPO / "tests" / "data" / "guard"
    folder.mkdir(parents=True, exist_ok=True)
    runs = [(run, {"exp": exp}) for exp, runs in healthy.items() for run in runs]
    for case, run in zoo:
        failed = failure(run, case.exp, healthy[case.exp])
        if failed is not None:
            runs.append(
                (
                    run,
                    {
                        "exp": case.exp,
                        "cause": case.cause,
                        "overrides": case.overrides,
                        "failure": failed[0],
                        "failure_step": failed[1],
                    },
                )
            )
    for run, facts in runs:
        with open(out / run.name / "divergence" / "series.jsonl", "rb") as source:
            (folder / f"{run.name}.jsonl.gz").write_bytes(gzip.compress(source.read(), mtime=0))
        (folder / f"{run.name}.json").write_text(json.dumps(facts, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_guard")
    parser.add_argument(
        "--parts", nargs="+", default=["healthy", "zoo", "actions"], choices=["healthy", "zoo", "actions"]
    )
    parser.add_argument("--only", nargs="*", help="run only these exps / zoo cases")
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs in --out instead of training"
    )
    parser.add_argument(
        "--fixtures", action="store_true", help="copy the recorded series to tests/data/guard"
    )
    args = parser.parse_args()

    def wanted(name):
        return not args.only or name in args.only

    healthy = {
        exp: [
            run(args.out, f"healthy-{exp}-s{seed}", exp, [f"seed={seed}", *spec["overrides"]], args.reuse)
            for seed in SEEDS
        ]
        for exp, spec in EXPS.items()
        if wanted(exp) or ("healthy" not in args.parts and args.reuse)
    }
    levels = {exp: healthy_level(runs, exp) for exp, runs in healthy.items()}
    rows, false_alarms = healthy_table(healthy)
    tables = {"healthy": rows}
    cases = [case for case in ZOO if wanted(case.name) and case.exp in levels]
    zoo: list[tuple[Case, Run]] = []
    if "zoo" in args.parts or "actions" in args.parts:
        zoo = [
            (
                case,
                run(
                    args.out,
                    f"zoo-{case.name}",
                    case.exp,
                    [*case.overrides, "divergence.action=warn", "divergence.nonfinite.action=halt"],
                    args.reuse,
                ),
            )
            for case in cases
        ]
        tables["zoo"] = zoo_table(zoo, healthy, false_alarms)
    if "actions" in args.parts:
        acted = [
            (
                case,
                {
                    "warn": zoo_run,
                    **{
                        action: run(
                            args.out,
                            f"zoo-{case.name}-{action}",
                            case.exp,
                            [*case.overrides, *ACTIONS[action]],
                            args.reuse,
                        )
                        for action in ACTIONS
                    },
                },
            )
            for case, zoo_run in zoo
        ]
        tables["actions"] = actions_table(acted, levels)
    if args.fixtures:
        save_fixtures(args.out, healthy, zoo if "zoo" in args.parts else [])
    titles = {"healthy": "healthy runs", "zoo": "the zoo", "actions": "the zoo with the guard's actions"}
    for name, rows in tables.items():
        print(heading(f"The divergence zoo: {titles[name]}"))
        print("\n".join(rows))
    (args.out / "results.json").write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
