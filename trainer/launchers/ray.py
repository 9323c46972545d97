"""Runs the job on a Ray cluster with Ray Train: the same `train()` on every worker, DDP (or FSDP) between
them.

The driver (this process) connects to a cluster (or starts one on this machine), checks that it can hold
the workers, and hands the resolved config to a TorchTrainer. Each worker builds the run exactly as
`launcher=local` does, with Ray's strategy and cluster environment in place of the config's. Every time
the last checkpoint is written it is also reported to Ray Train, so when a worker or a node dies, Ray
restarts the worker group and training continues from that checkpoint; re-running the command with the
same run dir continues the same Ray run (its name and storage follow from the run dir).

The console is that of `launcher=local`: the workers' own console lines (trainer/reporting/console.py: rank
0's, and the
other ranks' warnings and errors, marked with their rank), without Ray's `(pid=...)` prefix. What Ray's own
processes print (Ray Train's controller and helper actors, Ray's core) goes to the driver's train.log, which
also names the Ray session folder that holds the logs of every Ray process (`trainer -v` shows it all). In
train.log, Ray's account of a failure (which worker died, the retry, the tracebacks) sits in time order next
to the workers' own lines; the session folder, spread over dozens of files on each node and gone with the
machine's /tmp, is the place for what Ray's processes did not print.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from trainer.callbacks.last_checkpoint import LastCheckpoint
from trainer.callbacks.metrics import MetricsFile
from trainer.config.plain import plain_dict
from trainer.config.ranges import Interval, NonNegativeFloat, Positive, PositiveFloat
from trainer.config.resume import refuse_changed_config
from trainer.distributed.strategies import read_distributed
from trainer.errors import DivergenceHalt, UserError
from trainer.files import write_json_atomic
from trainer.reporting.console import adopt_library_loggers

STRATEGIES = ("ddp", "fsdp")
TRAIN_WORKER = "RayTrainWorker"  # the actor name of Ray Train's workers, which run `_worker_main`
# What a training worker prints that its console does not decide: Ray's C++ core's log lines
# ("[2026-12-04 21:33:54,129 E 20117 20164] core_worker.cc:2465: ...") and Ray Train's lines from before
# `train()` sets up the console.
RAY_WORKER_LINES = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] |Setting up process group for: ")
# Ray's printer of its workers' output, as `ray.init(log_to_driver=True)` registers it (and ray.shutdown
# removes it): ours takes its place under the same name.
RAY_PRINTER = "ray_print_logs"
ray_output = logging.getLogger("ray.processes")  # what Ray's processes print: train.log, shown with -v


class RayLauncher:
    def __init__(
        self,
        num_workers: Positive = 2,
        use_gpu: bool = False,
        resources_per_worker: dict[str, NonNegativeFloat] | None = None,
        address: str | None = None,
        storage_path: str | None = None,
        max_failures: Annotated[int, Interval(low=-1)] = 3,  # -1: retry forever
        strategy: str = "ddp",
        placement_strategy: str = "PACK",
        connect_timeout_s: PositiveFloat = 30.0,
    ):
        if num_workers < 1:
            raise UserError(f"launcher.num_workers={num_workers}: need at least one worker")
        if strategy not in STRATEGIES:
            raise UserError(f"launcher.strategy={strategy} is not one of {', '.join(STRATEGIES)}")
        self.num_workers, self.use_gpu, self.address = num_workers, use_gpu, address
        self.resources_per_worker = dict(resources_per_worker or {"CPU": 1})
        self.storage_path, self.max_failures, self.strategy = storage_path, max_failures, strategy
        self.placement_strategy, self.connect_timeout_s = placement_strategy, connect_timeout_s

    def launch(self, cfg: DictConfig) -> dict[str, Any]:
        """Trains with Ray Train; with `mode=tune`, runs a Ray Tune sweep whose trials train that way."""
        sync = read_distributed(cfg.distributed).sync  # said once here, rather than in every worker
        if self.strategy == "fsdp" and sync != "allreduce":
            raise UserError(
                f"distributed.sync={sync} averages whole replicas; FSDP shards them: "
                "use launcher.strategy=ddp"
            )
        self.connect()
        if cfg.mode == "tune":
            from trainer.sweeps.tune import tune_sweep

            return tune_sweep(self, cfg)
        return self.fit(cfg)

    def fit(self, cfg: DictConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
        """One Ray Train run on the connected cluster; `callbacks` are Ray Train's (e.g. Tune's reporting)."""
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer

        run_dir = Path(cfg.run_dir).resolve()
        # The workers would refuse a run dir of another config's run, once per retry: said once, here.
        refuse_changed_config(run_dir, cfg.resume, cfg.ckpt_path, plain_dict(cfg))
        self._check_capacity(ray.cluster_resources())
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"cfg": plain_dict(cfg), "strategy": self.strategy},
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=self.num_workers,
                use_gpu=self.use_gpu,
                resources_per_worker=self.resources_per_worker,
                placement_strategy=self.placement_strategy,
            ),
            run_config=RunConfig(
                name=ray_run_name(cfg.name, run_dir),
                storage_path=str(Path(self.storage_path or run_dir / "ray").expanduser().resolve()),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise _user_error_of(e) or e from None
        if halted := (result.metrics or {}).get(HALTED):
            raise DivergenceHalt(halted)
        metrics = json.loads((result.metrics or {}).get("metrics_json", "{}"))
        if metrics:  # rank 0 may have run on another node: the driver's run dir gets the file too
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "metrics.json", metrics)
        return metrics

    def connect(self) -> None:
        if self.address is None:
            # A cluster of this machine alone: bind it to loopback, not the machine's network address.
            # (Ray reads this when it is imported, so before `import ray`.)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
        import ray.train  # with Ray Data, whose loggers print by themselves from its import on

        adopt_library_loggers()  # Ray's too, before ray.init speaks
        if ray.is_initialized():
            return
        if self.address is None:
            # "local": always a new cluster, even when `ray start` left one running on this machine.
            # The dashboard serves Ray's state API, which Ray Train needs to clean up after a stopped run.
            context = ray.init(address="local", include_dashboard=True, configure_logging=False)
        else:
            context = self._join_cluster(self.address)
        if session := getattr(context, "address_info", {}).get("session_dir"):  # none through ray://
            ray_output.info(f"Ray session {session}: the logs of all its processes are in its logs/")
        _route_worker_output()

    def _join_cluster(self, address: str) -> Any:
        import ray

        if address not in ("auto",) and not address.startswith("ray://"):
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection(
                    (host or "127.0.0.1", int(port)), timeout=self.connect_timeout_s
                ).close()
            except (OSError, ValueError) as e:
                raise UserError(
                    f"cannot reach the Ray cluster at launcher.address={address} ({e}): start it with "
                    "`ray start --head`, fix the address, or leave launcher.address unset for a local cluster"
                ) from None
        try:
            return ray.init(address=address, include_dashboard=False, configure_logging=False)
        except ConnectionError as e:
            raise UserError(f"cannot connect to the Ray cluster at launcher.address={address}: {e}") from None

    def _check_capacity(self, available: Mapping[str, float]) -> None:
        """Refuse at once a request the cluster can never hold, rather than wait for it forever."""
        wanted = dict(self.resources_per_worker)
        if self.use_gpu:
            wanted.setdefault("GPU", 1)
        for resource, per_worker in wanted.items():
            need, have = per_worker * self.num_workers, available.get(resource, 0)
            if need > have:
                raise UserError(
                    f"launcher.num_workers={self.num_workers} x {per_worker:g} {resource} "
                    f"needs {need:g} {resource}, "
                    f"the Ray cluster has {have:g}: lower launcher.num_workers or "
                    f"launcher.resources_per_worker, or add nodes"
                )


def _route_worker_output() -> None:
    """Ray's log monitor hands the driver what the job's processes print: `route_output` decides where it
    goes, in place of Ray's printer (whose `(pid=...)`-prefixed lines were Ray's noise on the console)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(RAY_PRINTER, route_output)


def route_output(batch: dict[str, Any]) -> None:
    """A batch of lines one Ray process printed (to stderr if `is_err`). The training workers' lines are their
    consoles', the run's: to the console as they are. The rest is Ray's (its Train controller, its placement
    group cleaner, its core; their tracebacks when the cluster is slow or shuts down): to train.log, prefixed
    as Ray prefixes them, next to the run's own lines, where a user looking into a failure reads first."""
    from ray._private.worker import filter_autoscaler_events

    source = batch.get("actor_name") or batch.get("task_name") or ""
    ip = "" if batch.get("ip") == batch.get("localhost") else f", ip={batch.get('ip')}"
    prefix = f"({source}{' ' if source else ''}pid={batch.get('pid')}{ip})"
    stream = sys.stderr if batch.get("is_err") else sys.stdout
    lines = batch.get("lines", [])
    if batch.get("pid") == "autoscaler":  # its full status every 5 s: only its events, as Ray's printer does
        lines = filter_autoscaler_events(lines)
    for line in lines:
        if source == TRAIN_WORKER and not RAY_WORKER_LINES.match(line):
            print(line, file=stream, flush=True)
        else:
            ray_output.info("%s %s", prefix, line)


def ray_run_name(name: str, run_dir: Path) -> str:
    """Deterministic, so that running the command again with the same run dir continues the same Ray run."""
    return f"{name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]}"


class ReportingLastCheckpoint(LastCheckpoint):
    """Writes last.ckpt as usual, then reports it to Ray Train, which keeps it for restarts.

    Every worker reports each time (Ray requires it); rank 0 attaches the checkpoint and the content of
    metrics.json."""

    def save(self, trainer: L.Trainer) -> bool:
        from ray.util import get_current_placement_group

        from trainer.sweeps.release import PLACEMENT_GROUP

        if not super().save(trainer):
            return False
        metrics: dict[str, Any] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        if not trainer.is_global_zero:
            report_to_ray(metrics, None)
            return True
        metrics_file = next((cb for cb in trainer.callbacks if isinstance(cb, MetricsFile)), None)  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        if metrics_file is not None:
            metrics["metrics_json"] = json.dumps(metrics_file.metrics)
            # The current values too, for Ray Tune's schedulers (trainer/sweeps/tune.py).
            metrics.update({name: entry["final"] for name, entry in metrics_file.metrics.items()})
        if group := get_current_placement_group():  # for a sweep to free it when it stops the trial
            metrics[PLACEMENT_GROUP] = group.id.hex()
        report_to_ray(metrics, self.dirpath / "last.ckpt")
        return True


def report_to_ray(metrics: dict[str, Any], last_checkpoint: Path | None) -> None:
    """A report to Ray Train, which every worker makes (Ray requires it): rank 0 with a checkpoint folder that
    holds last.ckpt where there is one (Ray's result carries the metrics of the latest checkpoint only)."""
    import ray.train

    if last_checkpoint is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="trainer-ray-ckpt-") as folder:
        if last_checkpoint.is_file():
            _link_or_copy(last_checkpoint, Path(folder) / "last.ckpt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


HALTED = "divergence_halt"  # the key of a halted run's last report: the driver raises it again


def _user_error_of(failure: Exception) -> UserError | None:
    """The user's error that failed a worker (the same on every worker: bad data, a config value only the
    run itself can check), to end the launch in its one line rather than in Ray's traceback."""
    failures = getattr(failure, "worker_failures", None) or {}
    for error in failures.values():
        cause = getattr(error, "cause", error)  # a RayTaskError wraps the worker's own exception
        if isinstance(cause, UserError):
            return cause
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # Ray copies the folder into its storage; a hard link avoids a local copy
    except OSError:
        shutil.copy2(source, target)


def _worker_main(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from ray.train.lightning import RayDDPStrategy, RayFSDPStrategy, RayLightningEnvironment, prepare_trainer

    from trainer.distributed.fsdp import FSDPStrategy
    from trainer.distributed.sync import DataParallelStrategy
    from trainer.run import train

    cfg = OmegaConf.create(config["cfg"])
    assert isinstance(cfg, DictConfig)
    rank_zero_only.rank = ray.train.get_context().get_world_rank()  # before loggers are built
    if OmegaConf.select(cfg, "callbacks.last_checkpoint") is not None:
        cfg.callbacks.last_checkpoint._target_ = f"{__name__}.ReportingLastCheckpoint"
    cfg.trainer.devices, cfg.trainer.num_nodes = "auto", 1  # Ray gives each worker its own device(s)

    class RayShardedStrategy(FSDPStrategy, RayFSDPStrategy):
        """trainer=fsdp's strategy on the device Ray gave this worker."""

    class RayDataParallel(DataParallelStrategy, RayDDPStrategy):
        """trainer=ddp's strategy (and its distributed.sync) on the device Ray gave this worker."""

    strategy = RayShardedStrategy if config["strategy"] == "fsdp" else RayDataParallel

    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts the workers after a failure
    with checkpoint.as_directory() if checkpoint else nullcontext() as restored:
        last = Path(restored) / "last.ckpt" if restored else None  # (a halt's report may carry none)
        try:
            train(
                cfg,
                strategy=strategy,
                plugins=[RayLightningEnvironment()],
                ckpt_path=str(last) if last is not None and last.is_file() else None,
                prepare=prepare_trainer,
            )
        except DivergenceHalt as e:
            # Every worker takes the guard's decisions alike, so all of them stop here: ended as a result, not
            # as a failure, Ray does not restart the run only for it to halt again at the same step.
            rank_zero = ray.train.get_context().get_world_rank() == 0
            report_to_ray(
                {HALTED: str(e)}, Path(cfg.run_dir) / "checkpoints" / "last.ckpt" if rank_zero else None
            )
