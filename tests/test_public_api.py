"""`from trainer import ...` is the API for own tasks: every name of it resolves to the object the package
uses internally, whichever module defines it, and importing the package costs no torch or Lightning."""

import ast
import importlib
import subprocess
import sys

import pytest
from helpers import REPO

import trainer

# The contract (docs/own-task.md): a name leaves it only by a deliberate change of this list.
PUBLIC = {
    "Task",
    "StepReport",
    "GANReport",
    "PolicyReport",
    "ValueReport",
    "ValidationReport",
    "stepwise",
    "ResumableLoader",
    "evaluation_loader",
    "UserError",
    "Interval",
    "PowerOfTwo",
    "Matches",
    "Positive",
    "NonNegative",
    "Seed",
    "PositiveOrMinusOne",
    "NonNegativeOrMinusOne",
    "PositiveFloat",
    "NonNegativeFloat",
    "FiniteFloat",
    "Fraction",
    "FractionBelowOne",
    "FractionAboveZero",
}


def type_checking_imports() -> dict[str, str]:
    """Name -> module of the `if TYPE_CHECKING:` imports of trainer/__init__.py: what type checkers see."""
    tree = ast.parse((REPO / "trainer" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imports = [node for node in block.body if isinstance(node, ast.ImportFrom)]
    return {alias.name: node.module for node in imports for alias in node.names}


def test_the_public_names_are_the_internal_objects() -> None:
    homes = type_checking_imports()
    assert set(trainer.__all__) == PUBLIC == set(homes)
    for name, module in homes.items():
        assert getattr(trainer, name) is getattr(importlib.import_module(module), name), name
    namespace: dict = {}
    exec("from trainer import *", namespace)
    assert set(namespace) >= PUBLIC


def test_a_name_outside_the_api_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Taks'"):
        trainer.Taks  # noqa: B018
    with pytest.raises(ImportError):
        from trainer import Taks  # noqa: F401


def imported_by(code: str) -> set[str]:
    """The top-level modules a fresh interpreter imports to run `code` (from `-X importtime`)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def test_importing_the_package_and_its_ranges_imports_no_torch() -> None:
    """The CLI imports the package before it knows what a command needs, and an own data module's annotations
    (`batch_size: Positive`) are read by the config check, which must stay fast."""
    heavy = {"torch", "lightning", "hydra", "typing"}
    assert not heavy & imported_by("import trainer")
    assert not {"torch", "lightning"} & imported_by("from trainer import Positive, UserError")


def test_help_imports_no_torch() -> None:
    modules = imported_by(
        "import sys; sys.argv = ['trainer', '--help']; from trainer.__main__ import main; main()"
    )
    assert "hydra" in modules and not {"torch", "lightning"} & modules
