"""The `distributed` config node (conf/config.yaml), as the config check holds it before anything runs
(trainer/config/check.py reads this file's source): how data-parallel workers stay in step (sync.py), and
FSDP's settings, which conf/trainer/fsdp*.yaml hand to FSDPStrategy (fsdp.py)."""

from dataclasses import dataclass, field

from trainer.config.ranges import FractionBelowOne, Positive, PositiveFloat, SyncMode


@dataclass
class OuterSettings:
    """DiLoCo's outer optimizer: SGD on the workers' average change (DiLoCo's values)."""

    lr: PositiveFloat = 0.7
    momentum: FractionBelowOne = 0.9
    nesterov: bool = True


@dataclass
class FSDPSettings:
    # Their choices are FSDPStrategy's to check, where conf/trainer/fsdp*.yaml hand them over.
    sharding_strategy: str = "FULL_SHARD"
    wrap: list[str] = field(default_factory=list)
    activation_checkpointing: bool = False
    state_dict_type: str = "full"


@dataclass
class DistributedSettings:
    find_unused_parameters: bool = False  # DDP's
    sync: SyncMode = "allreduce"
    sync_every: Positive = 50  # local_sgd, diloco: optimizer steps between syncs
    outer: OuterSettings = field(default_factory=OuterSettings)
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
