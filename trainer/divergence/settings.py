"""The guard's settings, the `divergence` config node (conf/divergence/default.yaml): one dataclass per
detector, with the ranges the config check holds them to before anything runs (trainer/config/check.py reads
this file's source: a field typed with a dataclass of this module is checked as a node of its own)."""

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from trainer.config.ranges import (
    Fraction,
    FractionAboveZero,
    Interval,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
)

Action = Literal["warn", "clip", "skip", "rollback", "halt"]
AtLeastTwo = Annotated[int, Interval(low=2)]  # a spread needs two values
AtLeastOneFloat = Annotated[float, Interval(low=1)]  # a ratio to the reference level
AboveOneFloat = Annotated[float, Interval(low=1, low_open=True)]  # a ratio that must exceed it


@dataclass
class NonfiniteSettings:
    enabled: bool = True
    action: Action | None = None  # None: divergence.action


@dataclass
class SpikeSettings:
    enabled: bool = True
    action: Action | None = "warn"
    window: AtLeastTwo = 200
    warmup: AtLeastTwo = 50  # <= window (SpikeDetector)
    threshold: PositiveFloat = 6.0
    min_ratio: AtLeastOneFloat = 3.0
    patience: Positive = 10
    early_ratio: AtLeastOneFloat = 10.0
    per_series: dict[str, Any] = field(default_factory=dict)  # glob -> some of these settings


@dataclass
class BlowupSettings:
    enabled: bool = True
    factor: AboveOneFloat = 100.0
    action: Action | None = None


@dataclass
class LevelSettings:
    enabled: bool = True
    action: Action | None = "warn"
    window: Positive = 20
    ratio: AboveOneFloat = 2.0
    warmup: Positive = 50  # >= window (LevelDetector)
    per_series: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricSettings:
    enabled: bool = True
    name: str | None = None  # conf: ${monitor.metric}
    mode: Literal["min", "max"] = "min"  # conf: ${monitor.mode}
    margin: PositiveFloat = 0.5
    evaluations: Positive = 2
    action: Action | None = "warn"


@dataclass
class CollapseSettings:
    enabled: bool = True
    action: Action | None = "warn"
    d_wins_share: Fraction = 0.5
    d_x_above: Fraction = 0.99
    d_g_z_below: Fraction = 0.005
    diversity_fraction: Fraction = 0.5
    diversity_reached: NonNegativeFloat = 0.3
    entropy_fraction: Fraction = 0.2
    value_multiple: PositiveFloat = 2.0
    rl_steps: Positive = 5
    max_policy_kl: PositiveFloat = 0.2


@dataclass
class RollbackSettings:
    lr_scale: FractionAboveZero = 0.5
    max_rollbacks: NonNegative = 3
    snapshot_every: Positive = 100


@dataclass
class InjectSettings:
    step: NonNegative | None = None
    kind: Literal["nan_batch", "nan_weight", "huge_lr"] = "nan_batch"
    layer: str | None = None
    rank: NonNegative | None = None


@dataclass
class DivergenceSettings:
    enabled: bool = True
    action: Action = "rollback"
    nonfinite: NonfiniteSettings = field(default_factory=NonfiniteSettings)
    spike: SpikeSettings = field(default_factory=SpikeSettings)
    blowup: BlowupSettings = field(default_factory=BlowupSettings)
    level: LevelSettings = field(default_factory=LevelSettings)
    metric: MetricSettings = field(default_factory=MetricSettings)
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    rollback: RollbackSettings = field(default_factory=RollbackSettings)
    report_every: NonNegative = 200
    max_bundle_mb: NonNegativeFloat = 200.0
    pictures: bool = True
    record: bool = False
    history: Positive = 300
    inject: InjectSettings = field(default_factory=InjectSettings)
