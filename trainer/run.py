"""The training job: build data, model, task, loggers and callbacks from the config, then fit.

Every launcher ends up here, on every rank: `local` calls it directly, Ray calls it inside each worker,
SLURM inside each task.
"""

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments.slurm import SLURMEnvironment
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from omegaconf import DictConfig, OmegaConf

from trainer.callbacks.best_checkpoint import BestCheckpoint
from trainer.callbacks.config_file import ConfigFile
from trainer.callbacks.metrics import MetricsFile
from trainer.callbacks.preemption import Preemption
from trainer.callbacks.progress import ProgressBar
from trainer.callbacks.rng import RNGState
from trainer.checkpoint import SafeCheckpointIO, resume_checkpoint
from trainer.config.build import build
from trainer.config.plain import plain_dict
from trainer.data.loading import LoaderPosition
from trainer.distributed.settings import DistributedSettings
from trainer.distributed.strategies import build_strategy, configured_strategy, read_distributed, worker_sync
from trainer.divergence.guard import divergence_callbacks, divergence_verdict
from trainer.divergence.lr_find import LRRangeTest, lr_find_config
from trainer.errors import DivergedRun, DivergenceHalt, Preempted, UserError
from trainer.perf.compiling import compile_parts
from trainer.reporting.console import setup_logging
from trainer.reporting.loggers import finish_wandb, wandb_run_url
from trainer.reporting.summary import RunEnd, write_summary

log = logging.getLogger(__name__)


def train(
    cfg: DictConfig,
    *,
    strategy: type[Strategy] | None = None,
    plugins: Sequence[Any] = (),
    ckpt_path: str | None = None,
    prepare: Callable[[L.Trainer], L.Trainer] | None = None,
) -> dict[str, Any]:
    """Fits the configured task; returns the content of <run dir>/metrics.json.

    Launchers pass what their cluster needs: a `strategy` class (built with the run's `distributed`
    settings) and environment `plugins` that replace the config's, a `ckpt_path` that wins over the run
    dir's own last checkpoint, and a `prepare` step."""
    started = time.monotonic()
    run_dir = Path(cfg.run_dir)
    setup_logging(run_dir, verbose=bool(cfg.get("verbose")), rank=rank_zero_only.rank)
    if cfg.mode == "tune":
        raise UserError("mode=tune is a Ray Tune sweep and runs on Ray: use launcher=ray or launcher=slurm")
    if cfg.mode not in ("train", "lr_find"):
        raise UserError(f"mode={cfg.mode} is not an option: use mode=train, lr_find or tune")
    if cfg.mode == "lr_find":
        cfg = lr_find_config(cfg)
    resolved = plain_dict(cfg)
    # First: a run dir that holds another config's run is refused before anything is built or written.
    ckpt_path = ckpt_path or resume_checkpoint(
        run_dir, cfg.resume, cfg.ckpt_path, keep_old=rank_zero_only.rank == 0, config=resolved
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build_task(cfg)
    pl_trainer, metrics_file = build_trainer(cfg, module, strategy=strategy, plugins=plugins)
    if prepare is not None:
        pl_trainer = prepare(pl_trainer)

    pl_trainer.callbacks.append(ConfigFile(run_dir, resolved))  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
    log.info(f"run dir {run_dir}; model: {describe_model(module)}")
    if ckpt_path:
        log.info(f"resuming from {ckpt_path}")
    for logger in pl_trainer.loggers:
        logger.log_hyperparams({**resolved, "git": git_state()})
    end = RunEnd("failed", 0.0, 0, 0)
    preempted: Preemption | None = None
    try:
        pl_trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        callbacks = pl_trainer.callbacks  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        preempted = next((cb for cb in callbacks if isinstance(cb, Preemption) and cb.stopped), None)
        end.outcome = "preempted" if preempted else "finished"
        if preempted is None and (verdict := divergence_verdict(pl_trainer)):
            raise DivergedRun(verdict, run_dir)
    except DivergedRun as e:
        end.outcome, end.detail = "diverged (the divergence guard's verdict)", e.verdict
        raise
    except DivergenceHalt:
        end.outcome = "stopped by the divergence guard"  # its events and bundle are in the summary
        raise
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit after saving
        end.outcome = "interrupted"
        raise
    except BaseException as e:
        end.detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise
    finally:
        end.seconds, end.steps = time.monotonic() - started, pl_trainer.global_step
        end.epochs, end.wandb_url = pl_trainer.current_epoch, wandb_run_url()
        finish_wandb()
        if pl_trainer.is_global_zero:
            try:
                write_summary(run_dir, end, cfg.monitor.metric)
            except Exception:  # the summary must never hide how the run ended
                log.exception("could not write summary.txt")
    if preempted is not None:
        raise Preempted(requeue=preempted.requeue)
    return metrics_file.metrics


def describe_model(module: torch.nn.Module) -> str:
    """`generator 369 K, discriminator 166 K parameters`: trainable ones, per part (`verbose=true` adds
    Lightning's full table)."""
    parts = [
        (name, sum(p.numel() for p in part.parameters() if p.requires_grad))
        for name, part in module.named_children()
    ]
    counted = [f"{name} {get_human_readable_count(n)}" for name, n in parts if n]
    return f"{', '.join(counted) or 'no trainable'} parameters"


def build_task(cfg: DictConfig) -> tuple[L.LightningDataModule | None, L.LightningModule]:
    """The data (none for RL: its tasks play in their environments), and the task with the model parts (every
    `_target_` node under `model`) passed by name. A part marked `_partial_` is a constructor that the task
    calls itself (RL networks are sized by the environment)."""
    if cfg.perf.matmul_precision:
        torch.set_float32_matmul_precision(cfg.perf.matmul_precision)
    datamodule = build(cfg.data, "data") if _is_buildable(cfg.get("data")) else None
    parts = {name: build(node, f"model.{name}") for name, node in cfg.model.items() if _is_buildable(node)}
    module = build(cfg.task, "task", **parts)
    if cfg.perf.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.perf.compile:
        compile_parts(module, cfg.perf.compile_backend, cfg.perf.compile_mode)
    return datamodule, module


def build_trainer(
    cfg: DictConfig,
    module: L.LightningModule,
    strategy: type[Strategy] | None = None,
    plugins: Sequence[Any] = (),
) -> tuple[L.Trainer, MetricsFile]:
    """Lightning's Trainer with the configured callbacks and loggers, plus what every run needs: metrics.json,
    RNG state in checkpoints, the best checkpoint of `monitor.metric`, and safe checkpoint files."""
    run_dir = Path(cfg.run_dir)
    metrics_file = MetricsFile(
        run_dir / "metrics.json",
        modes=plain_dict(modes, resolve=False) if (modes := OmegaConf.select(cfg, "metrics.modes")) else None,
        monitor=(cfg.monitor.metric, cfg.monitor.mode) if cfg.monitor.metric else None,
    )
    loggers = [
        build(node, f"logger.{name}") for name, node in (cfg.logger or {}).items() if _is_buildable(node)
    ]
    distributed = read_distributed(cfg.distributed)
    built = (
        build_strategy(strategy, distributed)
        if strategy is not None
        else configured_strategy(cfg.trainer.get("strategy"), distributed)
    )
    if not plugins and SLURMEnvironment.detect():
        plugins = [SLURMEnvironment(auto_requeue=False)]  # requeueing is the Preemption callback's job
    pl_trainer = build(
        cfg.trainer,
        "trainer",
        default_root_dir=str(run_dir),
        callbacks=run_callbacks(cfg, metrics_file, distributed),
        logger=loggers or False,
        plugins=[
            SafeCheckpointIO(expected_shapes={k: v.shape for k, v in module.state_dict().items()}),
            *plugins,
        ],
        **({"strategy": built} if built is not None else {}),
    )
    return pl_trainer, metrics_file


def run_callbacks(
    cfg: DictConfig, metrics_file: MetricsFile, distributed: DistributedSettings
) -> list[L.Callback]:
    """Every callback of a run, in the order Lightning calls each hook on them, and why:

    1. the workers' sync (local SGD, DiLoCo): the guard's snapshots, and a checkpoint of a sync step, must
       hold the synchronised model;
    2. the divergence guard (and its drills): at the end of a bad batch it acts before anything else reads
       the weights or writes a checkpoint;
    3. the configured callbacks (conf/callbacks: last.ckpt, gradients, preemption, final validation), and the
       LR finder in `mode=lr_find`;
    4. the progress bar; metrics.json, which reads what the callbacks before it logged; the RNG state and
       the loader position, which every checkpoint holds.
    Lightning moves the checkpoint callbacks to the end, in their order here: the best checkpoint of
    `monitor.metric` comes before last.ckpt, so that a resume from last.ckpt finds the best one written.
    """
    best = (
        [BestCheckpoint(Path(cfg.run_dir), cfg.monitor.metric, cfg.monitor.mode)]
        if cfg.monitor.metric
        else []
    )
    configured = [
        build(node, f"callbacks.{name}")
        for name, node in (cfg.callbacks or {}).items()
        if _is_buildable(node)
    ]
    lr_find = [LRRangeTest(**plain_dict(cfg.lr_find))] if cfg.mode == "lr_find" else []
    progress = [ProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    return [
        worker_sync(distributed),
        *divergence_callbacks(plain_dict(cfg.divergence)),
        *best,
        *configured,
        *lr_find,
        *progress,
        metrics_file,
        RNGState(cfg.seed),
        LoaderPosition(),
    ]


def _is_buildable(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def git_state() -> dict[str, Any]:
    """The commit the code ran from, and whether the tree had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}
