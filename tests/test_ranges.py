"""Every number a config can set has a range (trainer/config/ranges.py), and a value out of it is refused
in one line before anything runs: in the signatures of what conf/ builds, EXTERNAL_RANGES for what the project
does not own, RULES between two values."""

import inspect
import math
import typing
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from helpers import REPO, compose_config
from hydra.utils import get_object
from omegaconf import DictConfig

from trainer.config.build import _accepts, _describe
from trainer.config.check import check_config, config_nodes, target_signature
from trainer.config.ranges import (
    Constraint,
    FiniteFloat,
    Fraction,
    FractionAboveZero,
    FractionBelowOne,
    Interval,
    NonNegative,
    Positive,
    PositiveFloat,
    PositiveOrMinusOne,
    PowerOfTwo,
    Seed,
    SlurmTime,
)
from trainer.errors import UserError

CONF = REPO / "conf"

# Numeric parameters without a range, each with the reason ("target.parameter": why). None today: seeds have
# NumPy's range, a threshold of either sign is still finite (FiniteFloat). Keep it short and honest.
UNBOUNDED: dict[str, str] = {}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def every_config(tmp_path_factory: pytest.TempPathFactory) -> list[DictConfig]:
    """Each exp, and each option of each group with an exp of its family."""
    tmp_path = tmp_path_factory.mktemp("conf")
    configs = [compose_config(f"+exp={exp}", run_dir=tmp_path) for exp in options("exp")]
    for group in (
        "trainer",
        "logger",
        "callbacks",
        "debug",
        "launcher",
        "data",
        "env",
        "divergence",
        "hparams_search",
    ):
        for option in options(group):
            exp = {"squad": "qa", "gym": "ppo", "coco": "detector"}.get(option, "dcgan")
            extra = [f"data.root={tmp_path}"] if option == "image_folder" else []
            configs.append(compose_config(f"+exp={exp}", f"{group}={option}", *extra, run_dir=tmp_path))
    return configs


def conf_targets(configs: list[DictConfig]) -> dict[str, dict[str, Any]]:
    """Every target conf/ can configure, with the values conf/ sets on it (the numbers among them)."""
    found: dict[str, dict[str, Any]] = defaultdict(dict)
    for cfg in configs:
        for _, node, target in config_nodes(cfg):
            for key in node:
                if not str(key).startswith("_"):
                    raw = node._get_node(key)._value()
                    found[target][str(key)] = raw
    return found


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mentions_number(tp: Any) -> bool:
    return tp in (int, float) or any(mentions_number(a) for a in typing.get_args(tp) if a is not Ellipsis)


def has_range(tp: Any) -> bool:
    """A constraint anywhere in the type (`Positive | None`, `Sequence[Positive]`), or a closed choice."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return True
    if origin is typing.Annotated and any(isinstance(m, Constraint) for m in tp.__metadata__):
        return True
    return any(has_range(a) for a in args)


def unranged(target: str, conf_values: dict[str, Any], own: bool) -> list[str]:
    """The numeric parameters of `target` that the config check holds to no range: those conf/ sets to a
    number and, where the project owns the target, each of its own parameters that is annotated with a
    number type or defaults to a number (whether conf/ sets it or not)."""
    signature = target_signature(target, target)
    numeric = {key for key, value in conf_values.items() if is_number(value)}
    if own:  # (its own: parameters its `**kwargs` pass on to a base are the base's)
        for p in inspect.signature(get_object(target)).parameters.values():
            if is_number(p.default) or mentions_number(signature.hints.get(p.name)):
                numeric.add(p.name)
    return sorted(key for key in numeric if not has_range(signature.hints.get(key)))


def test_every_number_conf_can_set_has_a_range(every_config: list[DictConfig]) -> None:
    targets = conf_targets(every_config)
    # (the walk reaches what it must: the project's tasks and settings, and Lightning's Trainer)
    assert {
        "trainer.tasks.rl.dqn.DQN",
        "trainer.launchers.slurm.SlurmJob",
        "trainer.divergence.settings.SpikeSettings",  # (settings within settings: divergence.spike)
        "lightning.pytorch.Trainer",
    } <= set(targets)
    missing = {
        f"{target}.{key}"
        for target, values in targets.items()
        for key in unranged(target, values, own=target.startswith("trainer."))
    }
    assert sorted(missing - set(UNBOUNDED)) == []
    assert not set(UNBOUNDED) - missing, "a listed parameter has a range now: drop it"


class Unranged:
    """A target as a user might write it: one number with a range, two without."""

    def __init__(self, depth: Positive = 2, width: int = 3, scale=0.5, name: str = "x", on: bool = True):
        pass


def test_the_walk_finds_a_number_without_a_range() -> None:
    """Without this, a walk that found nothing would pass: `width: int` and an unannotated number are
    found, the ranged, textual and boolean parameters are not; conf/ setting a number counts too."""
    target = f"{__name__}.Unranged"
    assert unranged(target, {}, own=True) == ["scale", "width"]
    assert unranged(target, {"width": 5, "name": "y"}, own=False) == ["width"]


def test_every_config_conf_composes_passes_the_check(every_config: list[DictConfig]) -> None:
    """The ranges refuse no value conf/ ships, in any exp or group option."""
    for cfg in every_config:
        check_config(cfg)


@pytest.mark.parametrize(
    "tp,value,accepted",
    [
        (PositiveFloat, 1e-4, True),
        (PositiveFloat, 0.0, False),
        (PositiveFloat, math.nan, False),  # (NaN < 0 and NaN > 0 are both False: refused by name)
        (PositiveFloat, math.inf, False),
        (FiniteFloat, -3.5, True),
        (FiniteFloat, -math.inf, False),
        (Fraction, 1.0, True),
        (Fraction, 1.01, False),
        (FractionBelowOne, 0.999, True),
        (FractionBelowOne, 1.0, False),
        (FractionAboveZero, 0.0, False),
        (Positive, 1, True),
        (Positive, 0, False),
        (Positive, 1.5, False),
        (Seed, 2**32 - 1, True),
        (Seed, 2**32, False),
        (Seed, -1, False),
        (PositiveOrMinusOne, -1, True),
        (PositiveOrMinusOne, -2, False),
        (PositiveOrMinusOne, 0, False),
        (Sequence[Positive], [64, 64], True),
        (Sequence[Positive], [64, 0], False),
        (dict[str, NonNegative], {"a": 1, "b": -1}, False),
        (Literal[1, 3], True, False),  # (True == 1, but a bool is not a channel count)
        (Annotated[int, Interval(low=8), PowerOfTwo()], 64, True),
        (Annotated[int, Interval(low=8), PowerOfTwo()], 48, False),
        (Annotated[int, Interval(low=8), PowerOfTwo()], 4, False),
    ],
)
def test_a_range_holds_what_it_says(tp: Any, value: Any, accepted: bool) -> None:
    assert _accepts(tp, value) is accepted


@pytest.mark.parametrize(
    "time,accepted",
    [
        ("30", True),  # minutes
        (30, True),
        ("30:00", True),  # minutes:seconds
        ("12:00:00", True),  # hours:minutes:seconds
        ("2-0", True),  # days-hours
        ("2-12:30", True),  # days-hours:minutes
        ("2-12:30:00", True),  # days-hours:minutes:seconds
        ("UNLIMITED", True),
        ("infinite", True),
        ("forever", False),
        ("1:2:3:4", False),
        ("2-", False),
        ("12h", False),
        (-5, False),
    ],
)
def test_a_slurm_time_is_one_that_sbatch_reads(time: Any, accepted: bool) -> None:
    assert _accepts(SlurmTime, time) is accepted


@pytest.mark.parametrize(
    "tp,words",
    [
        (PositiveFloat, "float > 0, finite"),
        (FiniteFloat, "float, finite"),
        (FractionBelowOne, "float in [0, 1)"),
        (FractionAboveZero, "float in (0, 1]"),
        (Positive, "int >= 1"),
        (Seed, "int in [0, 4294967295]"),
        (PositiveOrMinusOne | None, "int >= 1 or -1 or null"),
        (Sequence[Positive], "list of int >= 1"),
        (Annotated[int, Interval(low=8), PowerOfTwo()], "int >= 8, a power of two"),
    ],
)
def test_a_range_is_said_in_words(tp: Any, words: str) -> None:
    assert _describe(tp) == words


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task.lr=-1"], "task.lr=-1 is out of range: expected float > 0, finite"),
        (["task.lr=nan"], "task.lr=nan is out of range: expected float > 0, finite"),
        (["task.lr=inf"], "task.lr=inf is out of range"),
        (["task.beta1=2"], "task.beta1=2 is out of range: expected float in [0, 1)"),
        (["task.beta2=1.0"], "task.beta2=1.0 is out of range"),
        # the key the user sets, not the one it reaches (model.generator.latent_dim: ${model.latent_dim})
        (["model.latent_dim=0"], "model.latent_dim=0 is out of range: expected int >= 1"),
        (["data.image_size=48"], "data.image_size=48 is out of range: expected int >= 8, a power of two"),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0 is out of range: expected float in [0, 1)"),
        (["data.channels=2"], "data.channels=2 has the wrong type: expected one of 1, 3"),
        (
            ["data.partition=random"],
            "data.partition='random' has the wrong type: expected one of 'iid', 'by_class'",
        ),
        (["seed=-1"], "seed=-1 is out of range: expected int in [0, 4294967295]"),
        (["++trainer.max_epochs=0"], "trainer.max_epochs=0 is out of range: expected int >= 1 or -1 or null"),
        (["++trainer.max_steps=0"], "trainer.max_steps=0 is out of range"),
        (["++trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5 is out of range"),
        (["++trainer.gradient_clip_val=-1.0"], "trainer.gradient_clip_val=-1.0 is out of range"),
        (["++trainer.devices=0"], "trainer.devices=0 is out of range"),
        (
            ["callbacks.gradients.log_every_n_steps=0"],
            "callbacks.gradients.log_every_n_steps=0 is out of range",
        ),
        (["logger.wandb.mode=sometimes"], "logger.wandb.mode='sometimes' has the wrong type"),
        (["distributed.sync_every=0"], "distributed.sync_every=0 is out of range"),
        # settings within settings (divergence.spike: trainer/divergence/settings.py), each checked as a node
        (
            ["divergence.spike.threshold=-1"],
            "divergence.spike.threshold=-1 is out of range: expected float > 0, finite",
        ),
        (
            ["divergence.spike.warmup=300"],
            "divergence.spike.warmup=300 is out of range: expected <= divergence.spike.window=200",
        ),
        (
            ["divergence.rollback.lr_scale=0"],
            "divergence.rollback.lr_scale=0 is out of range: expected float in (0",
        ),
        (["divergence.collapse.action=explode"], "divergence.collapse.action='explode' has the wrong type"),
        (["distributed.outer.momentum=1.0"], "distributed.outer.momentum=1.0 is out of range"),
        (["trainer=ddp", "distributed.sync=gossip"], "distributed.sync='gossip' has the wrong type"),
        (["data=image_folder", "data.root=/tmp", "data.batch_size=0"], "data.batch_size=0 is out of range"),
        (["hparams_search=dcgan_asha", "tune.reduction_factor=1"], "tune.reduction_factor=1 is out of range"),
        (
            ["launcher=slurm", "slurm.time=forever"],
            "slurm.time='forever' is out of range: expected int >= 0 or a SLURM",
        ),
        (["launcher=slurm", "slurm.nodes=0"], "slurm.nodes=0 is out of range"),
        (["launcher=slurm", "slurm.signal_seconds=0"], "slurm.signal_seconds=0 is out of range"),
        (["+exp=dqn", "task.buffer_size=0"], "task.buffer_size=0 is out of range: expected int >= 1"),
        (
            ["+exp=dqn", "task.buffer_size=64"],
            "task.buffer_size=64 is out of range: expected >= task.batch_size=128",
        ),
        (
            ["+exp=dqn", "task.learning_starts=20000"],
            "task.learning_starts=20000 is out of range: expected <= task",
        ),
        (["+exp=dqn", "task.tau=0"], "task.tau=0 is out of range: expected float in (0, 1]"),
        (["+exp=dqn", "task.exploration_fraction=0"], "task.exploration_fraction=0 is out of range"),
        (["+exp=dqn", "model.q_network.hidden=[64,0]"], "model.q_network.hidden=[64, 0] is out of range"),
        (["+exp=dqn", "env.max_episode_steps=0"], "env.max_episode_steps=0 is out of range"),
        (["+exp=ppo", "task.gamma=1.5"], "task.gamma=1.5 is out of range: expected float in [0, 1]"),
        (["+exp=ppo", "task.clip_coef=0"], "task.clip_coef=0 is out of range"),
        (
            ["+exp=ppo", "task.target_kl=-0.1"],
            "task.target_kl=-0.1 is out of range: expected float > 0, finite or null",
        ),
        (
            ["+exp=ppo", "task.num_minibatches=1000"],
            "task.num_minibatches=1000 is out of range: expected <= the rollout",
        ),
        (
            ["+exp=qa", "data.doc_stride=128"],
            "data.doc_stride=128 is out of range: expected < half of data.max_length",
        ),
        (["+exp=qa", "data.max_length=0"], "data.max_length=0 is out of range"),
        (
            ["+exp=qa", "task.null_threshold=nan"],
            "task.null_threshold=nan is out of range: expected float, finite",
        ),
        (["+exp=qa", "data.facts.train_paragraphs=-1"], "data.facts={"),
        (["+exp=detector", "model.detector.num_classes=0"], "model.detector.num_classes=0 is out of range"),
        (
            ["+exp=detector", "model.detector.nms_threshold=1.5"],
            "model.detector.nms_threshold=1.5 is out of range",
        ),
        (
            ["+exp=detector", "data.sizes=[96,0]"],
            "data.sizes=[96, 0] is out of range: expected list of int >= 1",
        ),
        (["+exp=detector", "data.hflip=2"], "data.hflip=2 is out of range"),
        (["lr_find.num_steps=2"], "lr_find.num_steps=2 is out of range: expected int >= 3"),
        (["lr_find.max_lr=1e-8"], "lr_find.max_lr=1e-08 is out of range: expected > lr_find.min_lr=1e-07"),
    ],
)
def test_a_value_out_of_range_is_refused_by_the_config_check(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    exp = [] if any(o.startswith("+exp=") for o in overrides) else ["+exp=dcgan"]
    with pytest.raises(UserError) as refused:
        check_config(compose_config(*exp, *overrides, run_dir=tmp_path))
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["++trainer.max_epochs=-1", "++trainer.max_steps=100"],  # what the RL exps do
        ["++trainer.max_epochs=null"],
        ["++trainer.limit_train_batches=5", "++trainer.limit_val_batches=0.5"],
        ["++trainer.val_check_interval=0.25"],
        ["++trainer.val_check_interval=00:00:10:00"],
        ["++trainer.devices=auto"],
        ["++trainer.fast_dev_run=true"],
        ["launcher=slurm", "slurm.time=2-12:00:00"],
        ["launcher=slurm", "slurm.time=90"],
        ["+exp=dqn", "task.buffer_size=128", "task.learning_starts=128"],  # a buffer of exactly one batch
        ["+exp=dqn", "task.gamma=1.0"],  # undiscounted: the task allows it
        ["+exp=qa", "data.doc_stride=127"],
    ],
)
def test_a_value_at_the_edge_of_its_range_is_accepted(overrides: list[str], tmp_path: Path) -> None:
    exp = [] if any(o.startswith("+exp=") for o in overrides) else ["+exp=dcgan"]
    check_config(compose_config(*exp, *overrides, run_dir=tmp_path))
