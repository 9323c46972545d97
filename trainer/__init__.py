"""trainer: Hydra-composed Lightning training, launched locally, on Ray or on SLURM.

The names in `__all__` are the API for your own tasks (docs/own-task.md): import them from here,
`from trainer import Task, StepReport, Positive`, not from the modules that define them, which may move.
Each is imported on first use: `import trainer` (the CLI's first step, before it knows what a command needs)
costs no torch or Lightning import.
"""

__version__ = "0.1.0"

TYPE_CHECKING = False  # (typing's, without importing typing, which would make `import trainer` 8 ms)
# What type checkers and readers see; at run time `__getattr__` imports each name on first use.
if TYPE_CHECKING:
    from trainer.config.ranges import (
        FiniteFloat,
        Fraction,
        FractionAboveZero,
        FractionBelowOne,
        Interval,
        Matches,
        NonNegative,
        NonNegativeFloat,
        NonNegativeOrMinusOne,
        Positive,
        PositiveFloat,
        PositiveOrMinusOne,
        PowerOfTwo,
        Seed,
    )
    from trainer.data.evaluation import evaluation_loader
    from trainer.data.loading import ResumableLoader
    from trainer.errors import UserError
    from trainer.tasks.base import (
        GANReport,
        PolicyReport,
        StepReport,
        Task,
        ValidationReport,
        ValueReport,
        stepwise,
    )

# The API (the contract: tests/test_public_api.py); `__getattr__` finds each in _HOMES, cheapest first.
__all__ = [
    "FiniteFloat",
    "Fraction",
    "FractionAboveZero",
    "FractionBelowOne",
    "GANReport",
    "Interval",
    "Matches",
    "NonNegative",
    "NonNegativeFloat",
    "NonNegativeOrMinusOne",
    "PolicyReport",
    "Positive",
    "PositiveFloat",
    "PositiveOrMinusOne",
    "PowerOfTwo",
    "ResumableLoader",
    "Seed",
    "StepReport",
    "Task",
    "UserError",
    "ValidationReport",
    "ValueReport",
    "evaluation_loader",
    "stepwise",
]
_HOMES = (
    "trainer.errors",
    "trainer.config.ranges",
    "trainer.tasks.base",
    "trainer.data.loading",
    "trainer.data.evaluation",
)


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (PEP 562)."""
    from importlib import import_module

    if name not in __all__:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = next(vars(home)[name] for home in map(import_module, _HOMES) if name in vars(home))
    globals()[name] = value  # found without this function from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
