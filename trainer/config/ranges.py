"""What a config value may be, beyond its type, which the config check enforces before anything runs
(trainer/config/check.py): `batch_size: Positive` refuses `data.batch_size=0` in one line instead of a
DataLoader
traceback later.

- The vocabulary: constraints (`Interval`, `PowerOfTwo`, `Matches`) and the named ranges built from them,
  used as annotations in the signatures of what conf/ builds (`lr: PositiveFloat`).
- Closed choices that more than one module reads (`Partition`, `SyncMode`).
- `EXTERNAL_RANGES`: the ranges of parameters conf/ sets on classes the project does not own (Lightning's
  Trainer), whose signatures cannot carry them.
- `RULES`: bounds between two values of one node (a replay buffer holds at least one batch).

Nothing here imports more than the standard library: the check reads signatures without importing them.
"""

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Interval:
    """Numbers from `low` to `high` (None: no bound), each end closed unless `*_open`; NaN and infinities are
    outside every interval. `or_minus_one`: -1 is allowed too (Lightning's "no limit" and "all")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    or_minus_one: bool = False

    def holds(self, value: float) -> bool:
        if self.or_minus_one and value == -1:
            return True
        if not math.isfinite(value):  # NaN compares False with any bound: refused by name, not by comparison
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, what: str) -> str:
        """`float > 0, finite`, `float in [0, 1)`, `int >= 1 or -1`."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            text = f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            text = f"{what} {'<' if self.high_open else '<='} {high}"
        else:
            text = what
        if what == "float" and (self.low is None or self.high is None):
            text += ", finite"  # (a two-sided interval says it already)
        return text + (" or -1" if self.or_minus_one else "")


@dataclass(frozen=True)
class PowerOfTwo:
    def holds(self, value: int) -> bool:
        return value > 0 and value & (value - 1) == 0

    def describe(self, what: str) -> str:
        return f"{what}, a power of two"


@dataclass(frozen=True)
class Matches:
    """A string in the format `pattern` matches in full; `words` name the format in the error."""

    pattern: str
    words: str

    def holds(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None

    def describe(self, what: str) -> str:
        return self.words


Constraint = Interval | PowerOfTwo | Matches


def _number(bound: float | None) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


# Integers.
Positive = Annotated[int, Interval(low=1)]  # counts and sizes: batch sizes, widths, steps
NonNegative = Annotated[int, Interval(low=0)]  # counts where 0 means none: loader workers, images logged
Seed = Annotated[int, Interval(0, 2**32 - 1)]  # what NumPy and Lightning's seed_everything accept
PositiveOrMinusOne = Annotated[int, Interval(low=1, or_minus_one=True)]  # Lightning: -1 is no limit / all
NonNegativeOrMinusOne = Annotated[int, Interval(low=0, or_minus_one=True)]

# Floats, all finite.
PositiveFloat = Annotated[float, Interval(low=0, low_open=True)]  # learning rates, clip norms, radii
NonNegativeFloat = Annotated[float, Interval(low=0)]  # weight decay, loss coefficients where 0 turns it off
FiniteFloat = Annotated[float, Interval()]  # a threshold on a score of either sign
Fraction = Annotated[float, Interval(0, 1)]  # probabilities, parts of a whole, discount factors
FractionBelowOne = Annotated[float, Interval(0, 1, high_open=True)]  # Adam's betas, momentum: 1 never decays
FractionAboveZero = Annotated[float, Interval(0, 1, low_open=True)]  # a step towards a target; 0 never moves

# `sbatch --time`: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds, or no limit; a whole number of minutes may be given as an int.
SlurmTime = (
    NonNegative
    | Annotated[
        str,
        Matches(
            r"(?i:unlimited|infinite)|\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}",
            "a SLURM time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes, "
            "days-hours:minutes:seconds or UNLIMITED",
        ),
    ]
)

# Closed choices read in more than one module.
Partition = Literal["iid", "by_class"]  # how data-parallel workers split the training data
SyncMode = Literal["allreduce", "local_sgd", "diloco"]  # how data-parallel workers stay in step

# The parameters conf/ sets on targets whose signatures the project does not own.
# (pyright cannot `|` a named range and None in an expression, which Python can: those lines are marked)
EXTERNAL_RANGES: dict[str, dict[str, Any]] = {
    "lightning.pytorch.Trainer": {
        "devices": PositiveOrMinusOne | str | list[NonNegative],  # a count, -1 (all), "auto", or GPU ids
        "num_nodes": Positive,
        # 0 ends fit() before its first batch, even with max_steps set (Lightning checks max_epochs
        # first), so 0 is refused outright; -1 trains until max_steps or the task stops (the RL exps).
        "max_epochs": PositiveOrMinusOne | None,  # pyright: ignore[reportOperatorIssue]
        "max_steps": PositiveOrMinusOne,  # 0 trains nothing either
        "log_every_n_steps": NonNegative | None,  # 0: no per-step logging  # pyright: ignore[reportOperatorIssue]
        "check_val_every_n_epoch": Positive | None,  # pyright: ignore[reportOperatorIssue]
        "num_sanity_val_steps": NonNegativeOrMinusOne | None,  # -1: the whole validation set  # pyright: ignore[reportOperatorIssue]
        "gradient_clip_val": NonNegativeFloat | None,  # pyright: ignore[reportOperatorIssue]
        "accumulate_grad_batches": Positive,
        "fast_dev_run": bool | NonNegative,
        # A number of batches, or a fraction of them.
        "limit_train_batches": NonNegative | Fraction | None,  # pyright: ignore[reportOperatorIssue]
        "limit_val_batches": NonNegative | Fraction | None,  # pyright: ignore[reportOperatorIssue]
        "overfit_batches": NonNegative | Fraction,
        # Batches between validations, a fraction of an epoch, or a time ("00:12:00:00", {"hours": 1}).
        "val_check_interval": Positive | FractionAboveZero | str | dict | None,  # pyright: ignore[reportOperatorIssue]
    },
}


@dataclass(frozen=True)
class Rule:
    """A bound on `key` that depends on another value of the same node (a node of `target`): `holds` reads
    the node's values; `expected` says the bound, with `{where}` (the node's path) and the node's values
    filled in, e.g. `>= {where}.batch_size={batch_size}`."""

    target: str
    key: str
    holds: Callable[[Mapping[str, Any]], bool]
    expected: str


RULES = [
    Rule(
        "trainer.tasks.rl.dqn.DQN",
        "buffer_size",
        lambda n: n["buffer_size"] >= n["batch_size"],
        ">= {where}.batch_size={batch_size}: the replay buffer must hold a batch",
    ),
    Rule(
        "trainer.tasks.rl.dqn.DQN",
        "learning_starts",
        lambda n: n["learning_starts"] <= n["buffer_size"],
        "<= {where}.buffer_size={buffer_size}: a buffer that never holds that many transitions never learns",
    ),
    Rule(
        "trainer.tasks.rl.ppo.PPO",
        "num_minibatches",
        lambda n: n["num_minibatches"] <= n["num_steps"] * n["num_envs"],
        "<= the rollout's {where}.num_steps={num_steps} x {where}.num_envs={num_envs} samples",
    ),
    Rule(
        "trainer.divergence.lr_find.LRRangeTest",
        "max_lr",
        lambda n: n["max_lr"] > n["min_lr"],
        "> {where}.min_lr={min_lr}: the test sweeps from min_lr up to max_lr",
    ),
    Rule(
        "trainer.divergence.settings.SpikeSettings",
        "warmup",
        lambda n: n["warmup"] <= n["window"],
        "<= {where}.window={window}: the spread is measured over the window",
    ),
    Rule(
        "trainer.divergence.settings.LevelSettings",
        "warmup",
        lambda n: n["warmup"] >= n["window"],
        ">= {where}.window={window}: a level is the median of a full window",
    ),
    Rule(
        "trainer.data.squad.SquadDataModule",
        "doc_stride",
        lambda n: n["doc_stride"] < n["max_length"] // 2,
        "< half of {where}.max_length={max_length}: the windows would not advance through the context",
    ),
]
