"""The run's `distributed` node, read once, and the strategy and sync built from it.

`conf/trainer/{ddp,fsdp}*.yaml` name a strategy class and what is Lightning's (devices, backend); how its
workers stay in step (`distributed.sync`) and how it shards (`distributed.fsdp`) are the `distributed` node's.
`read_distributed` turns that node into `DistributedSettings` once per process; the strategy, the workers'
sync and the Ray launcher all take that object, and nothing else reads the node.
"""

from dataclasses import asdict
from typing import Any

from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig

from trainer.config.build import build, build_settings, import_target
from trainer.config.plain import plain_dict
from trainer.distributed.fsdp import FSDPStrategy
from trainer.distributed.settings import DistributedSettings
from trainer.distributed.sync import DataParallelStrategy, WorkerSync
from trainer.errors import UserError


def read_distributed(node: DictConfig | None) -> DistributedSettings:
    """The `distributed` config node (conf/config.yaml) as settings."""
    return build_settings(DistributedSettings, plain_dict(node) if node is not None else None, "distributed")


def strategy_arguments(strategy: type, settings: DistributedSettings) -> tuple[str, dict[str, Any]]:
    """What a strategy class takes of the distributed settings, and the node they come from."""
    if issubclass(strategy, FSDPStrategy):
        return "distributed.fsdp", asdict(settings.fsdp)
    if issubclass(strategy, DataParallelStrategy):
        parallel = {"sync": settings.sync, "find_unused_parameters": settings.find_unused_parameters}
        return "distributed", parallel
    return "distributed", {}


def build_strategy(strategy: type[Strategy], settings: DistributedSettings, **kwargs: Any) -> Strategy:
    """A strategy class (a launcher's own, e.g. Ray's) built with the distributed settings."""
    return strategy(**kwargs, **strategy_arguments(strategy, settings)[1])


def configured_strategy(node: Any, settings: DistributedSettings) -> Strategy | None:
    """`trainer.strategy` as configured, when it is a `_target_` node, built with the distributed settings;
    None for a name such as "auto" or "ddp", which Lightning builds itself."""
    if not (isinstance(node, DictConfig) and "_target_" in node):
        return None
    where, arguments = strategy_arguments(import_target(str(node._target_), "trainer.strategy"), settings)
    for key in arguments.keys() & node.keys():  # two places for one setting: say which one counts
        raise UserError(f"trainer.strategy.{key} is a distributed setting: set {where}.{key} instead")
    return build(node, "trainer.strategy", **arguments)


def worker_sync(settings: DistributedSettings) -> WorkerSync:
    """The callback that keeps `local_sgd` and `diloco` workers in step (and counts bytes in every mode)."""
    outer = settings.outer
    return WorkerSync(settings.sync, settings.sync_every, outer.lr, outer.momentum, outer.nesterov)
