"""Runs the job on a Ray cluster with Ray Train: the same `train()` on every worker, DDP (or FSDP) between
them.

The driver (this process) connects to a cluster (or starts one on this machine), checks that it can hold
the workers, and hands the resolved config to a TorchTrainer. Each worker builds the run exactly as
`launcher=local` does, with Ray's strategy and cluster environment in place of the config's. Every time
the last checkpoint is written it is also reported to Ray Train, so when a worker or a node dies, Ray
restarts the worker group and training continues from that checkpoint; re-running the command with the
same run dir continues the same Ray run (its name and storage follow from the run dir).
"""

import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from trainer.callbacks.last_checkpoint import LastCheckpoint
from trainer.callbacks.metrics import MetricsFile
from trainer.errors import UserError
from trainer.files import write_json_atomic
from trainer.ranges import Positive
from trainer.sync import worker_sync

STRATEGIES = ("ddp", "fsdp")


class RayLauncher:
    def __init__(
        self,
        num_workers: Positive = 2,
        use_gpu: bool = False,
        resources_per_worker: dict[str, float] | None = None,
        address: str | None = None,
        storage_path: str | None = None,
        max_failures: int = 3,
        strategy: str = "ddp",
        placement_strategy: str = "PACK",
        connect_timeout_s: float = 30.0,
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
        worker_sync(cfg.distributed)  # its settings' errors here, once, rather than in every worker
        if self.strategy == "fsdp" and cfg.distributed.sync != "allreduce":
            raise UserError(
                f"distributed.sync={cfg.distributed.sync} averages whole replicas; FSDP shards them: "
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
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        run_dir = Path(cfg.run_dir).resolve()
        self._check_capacity(ray.cluster_resources())
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "strategy": self.strategy},
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
        result = trainer.fit()
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

        if ray.is_initialized():
            return
        if self.address is None:
            # "local": always a new cluster, even when `ray start` left one running on this machine.
            # The dashboard serves Ray's state API, which Ray Train needs to clean up after a stopped run.
            ray.init(address="local", include_dashboard=True, configure_logging=False)
            return
        if self.address not in ("auto",) and not self.address.startswith("ray://"):
            host, _, port = self.address.rpartition(":")
            try:
                socket.create_connection(
                    (host or "127.0.0.1", int(port)), timeout=self.connect_timeout_s
                ).close()
            except (OSError, ValueError) as e:
                raise UserError(
                    f"cannot reach the Ray cluster at launcher.address={self.address} ({e}): start it with "
                    "`ray start --head`, fix the address, or leave launcher.address unset for a local cluster"
                ) from None
        try:
            ray.init(address=self.address, include_dashboard=False, configure_logging=False)
        except ConnectionError as e:
            raise UserError(
                f"cannot connect to the Ray cluster at launcher.address={self.address}: {e}"
            ) from None

    def _check_capacity(self, available: dict[str, float]) -> None:
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


def ray_run_name(name: str, run_dir: Path) -> str:
    """Deterministic, so that running the command again with the same run dir continues the same Ray run."""
    return f"{name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]}"


class ReportingLastCheckpoint(LastCheckpoint):
    """Writes last.ckpt as usual, then reports it to Ray Train, which keeps it for restarts.

    Every worker reports each time (Ray requires it); rank 0 attaches the checkpoint and the content of
    metrics.json."""

    def save(self, trainer: L.Trainer) -> bool:
        import ray.train
        from ray.util import get_current_placement_group

        from trainer.sweeps.release import PLACEMENT_GROUP

        if not super().save(trainer):
            return False
        metrics: dict[str, Any] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        if not trainer.is_global_zero:
            ray.train.report(metrics, checkpoint=None)
            return True
        metrics_file = next((cb for cb in trainer.callbacks if isinstance(cb, MetricsFile)), None)
        if metrics_file is not None:
            metrics["metrics_json"] = json.dumps(metrics_file.metrics)
            # The current values too, for Ray Tune's schedulers (trainer/sweeps/tune.py).
            metrics.update({name: entry["final"] for name, entry in metrics_file.metrics.items()})
        if group := get_current_placement_group():  # for a sweep to free it when it stops the trial
            metrics[PLACEMENT_GROUP] = group.id.hex()
        with tempfile.TemporaryDirectory(prefix="trainer-ray-ckpt-") as folder:
            _link_or_copy(self.dirpath / "last.ckpt", Path(folder) / "last.ckpt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        return True


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

    from trainer.fsdp import FSDPStrategy
    from trainer.run import train
    from trainer.sync import DataParallelStrategy

    cfg = OmegaConf.create(config["cfg"])
    rank_zero_only.rank = ray.train.get_context().get_world_rank()  # before loggers are built
    if OmegaConf.select(cfg, "callbacks.last_checkpoint") is not None:
        cfg.callbacks.last_checkpoint._target_ = f"{__name__}.ReportingLastCheckpoint"
    cfg.trainer.devices, cfg.trainer.num_nodes = "auto", 1  # Ray gives each worker its own device(s)
    if config["strategy"] == "fsdp":

        class RayShardedStrategy(FSDPStrategy, RayFSDPStrategy):
            """trainer=fsdp's strategy on the device Ray gave this worker."""

        strategy = RayShardedStrategy(**cfg.distributed.fsdp)
    else:

        class RayDataParallel(DataParallelStrategy, RayDDPStrategy):
            """trainer=ddp's strategy (and its distributed.sync) on the device Ray gave this worker."""

        strategy = RayDataParallel(
            sync=cfg.distributed.sync, find_unused_parameters=cfg.distributed.find_unused_parameters
        )

    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts the workers after a failure
    with checkpoint.as_directory() if checkpoint else nullcontext() as restored:
        train(
            cfg,
            strategy=strategy,
            plugins=[RayLightningEnvironment()],
            ckpt_path=str(Path(restored) / "last.ckpt") if restored else None,
            prepare=prepare_trainer,
        )
