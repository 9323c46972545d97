"""Building objects from config nodes, with errors that name the key and the fix.

`hydra.utils.instantiate` reports a wrong key or a wrong type as a long traceback from deep inside the
target, often only when training is under way. `build` checks the node against the target's signature
first: unknown keys (with the closest valid name) and values whose type contradicts a plain annotation
(int, float, bool, str, Literal, Optional, lists and unions of those) are refused before anything runs.
The whole composed config is checked the same way before anything runs (config/check.py). A `_target_`
that cannot be imported is said with the reason: its module not found (and where it was looked for), an
error raised while importing it, or no such name in it.
"""

import dataclasses
import difflib
import functools
import importlib
import inspect
import operator
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config.ranges import (
    Constraint,
)
from trainer.config.signatures import SourceSignature
from trainer.errors import UserError

Settings = TypeVar("Settings")


def build(node: DictConfig, where: str, **kwargs: Any) -> Any:
    obj = import_target(str(node.get("_target_")), where)
    check_arguments(obj, node, where)
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, UserError):
            raise cause from None
        from lightning.fabric.utilities.exceptions import MisconfigurationException  # (slow to import)

        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise UserError(f"{where}: {cause}") from None
        raise


def build_settings(cls: type[Settings], node: Mapping[str, Any] | None, where: str) -> Settings:
    """Settings (a dataclass, as SETTINGS' in config/check.py) from their config node as plain data, each
    field that is settings of its own from its own node; a missing node or field keeps its default. A key
    that is not a field is a UserError (the config check has said so before anything ran, with the closest
    field)."""
    values = dict(node or {})
    for field in dataclasses.fields(cls):  # pyright: ignore[reportArgumentType]  # a dataclass (SETTINGS)
        nested = field.type
        if isinstance(nested, type) and dataclasses.is_dataclass(nested) and field.name in values:
            values[field.name] = build_settings(nested, values[field.name], f"{where}.{field.name}")
    try:
        return cls(**values)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


def import_target(target: str, where: str) -> Any:
    """The class or function a `_target_` names, resolved as `instantiate` resolves it; where it cannot be
    imported, a UserError that says why."""
    try:
        return _locate(target)  # (hydra.utils.get_object, without the error it logs)
    except Exception:
        why = _why_unimportable(target)
        raise UserError(f"{where}._target_={target} cannot be imported: {why}") from None


def _why_unimportable(target: str) -> str:
    """Its module is not found (and where it was looked for), or importing the module raised (what), or the
    module has no such name (and the names it has that are close)."""
    module_name, _, name = target.rpartition(".")
    if not module_name:
        return "write it as module.Name"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and f"{module_name}.".startswith(f"{e.name}."):  # the module itself, or its package
            holder = e.name.replace(".", "/") + (".py" if e.name == module_name else "/")
            return (
                f"no module named {e.name} (looked in {_import_places()}): run from the folder that holds "
                f"{holder}, or add it to PYTHONPATH"
            )
        return _raised(module_name, e)
    except Exception as e:  # anything the module's own code raises
        return _raised(module_name, e)
    close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=3)
    hint = f"did you mean {' or '.join(f'{module_name}.{c}' for c in close)}?" if close else "check the name"
    return f"module {module_name} ({module.__file__}) has no {name}: {hint}"


def _raised(module: str, error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"importing {module} raised {type(error).__name__}" + (f": {lines[0]}" if lines else "")


def _import_places() -> str:
    """Where Python looks for a module here, as a user would name the places."""
    cwd = os.getcwd()
    places = [f"the working directory {cwd}"] if {"", cwd} & set(sys.path) else []
    extra = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    places += [f"PYTHONPATH {extra}"] if extra else []
    return " and ".join([*places, "the installed packages"])


def check_arguments(target: Any, node: DictConfig, where: str) -> None:
    """`node`'s keys and values against the signature of `target`, an imported class or function."""
    if (signature := imported_signature(target)) is not None:
        check_node(node, where, _name(target), signature)


def imported_signature(target: Any) -> SourceSignature | None:
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    names = [p.name for p in params if p.kind not in variadic]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return SourceSignature(names, takes_any, _type_hints(target))


def check_node(node: DictConfig, where: str, target: str, signature: SourceSignature) -> None:
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in signature.names:
            if signature.takes_any:
                continue
            close = difflib.get_close_matches(key, signature.names, n=1)
            hint = (
                f"did you mean {where}.{close[0]}?" if close else f"valid keys: {', '.join(signature.names)}"
            )
            raise UserError(f"{where}.{key} is not an option of {target}: {hint}")
        if key in signature.hints and (value := resolved(node, key)) is not UNRESOLVED:
            check_value(set_as(node, key, f"{where}.{key}"), signature.hints[key], value)


UNRESOLVED = object()


def resolved(node: DictConfig, key: str) -> Any:
    """The value, or UNRESOLVED where it interpolates what only a running job knows (`--cfg` checks a config
    before Hydra has made its run dir)."""
    try:
        return node[key]
    except OmegaConfBaseException:
        return UNRESOLVED


def set_as(node: DictConfig, key: str, path: str) -> str:
    """The key the user sets this value by: `model.latent_dim` for `model.generator.latent_dim:
    ${model.latent_dim}`, through any chain of such plain references (not resolvers or relative ones)."""
    child = node._get_node(key)
    raw = child._value() if child is not None else None
    reference = re.fullmatch(r"\$\{(\w[\w.]*)\}", raw) if isinstance(raw, str) else None
    if reference is None:
        return path
    source = reference[1]
    parent_path, _, leaf = source.rpartition(".")
    try:
        parent = OmegaConf.select(node._get_root(), parent_path) if parent_path else node._get_root()
    except OmegaConfBaseException:
        return path
    return set_as(parent, leaf, source) if isinstance(parent, DictConfig) and leaf in parent else source


def check_value(key: str, tp: Any, value: Any) -> None:
    if _accepts(tp, value) is not False:
        return
    plain = _without_ranges(tp)
    if _accepts(plain, value) is False:
        refuse(key, value, "has the wrong type", _describe(plain))
    refuse(key, value, "is out of range", _describe(tp))


def refuse(key: str, value: Any, problem: str, expected: str) -> typing.NoReturn:
    shown = (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    )
    raise UserError(f"{key}={shown!r} {problem}: expected {expected}")


def _type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # unresolvable forward references: check keys only
        return {}


_SEQUENCES = (list, tuple, Sequence)
_MAPPINGS = (dict, Mapping)


def _constraints(tp: Any) -> list[Constraint]:
    return [m for m in tp.__metadata__ if isinstance(m, Constraint)]


def _without_ranges(tp: Any) -> Any:
    """The type alone: `Annotated[int, Interval(low=1)]` -> int, `Sequence[Positive] | None` ->
    `Sequence[int] | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _without_ranges(args[0])
    if origin is typing.Literal or not args:
        return tp
    plain = tuple(a if a is Ellipsis else _without_ranges(a) for a in args)
    try:
        return (
            functools.reduce(operator.or_, plain)
            if origin in (typing.Union, types.UnionType)
            else origin[plain]
        )
    except TypeError:  # a generic that cannot be rebuilt: left as it is
        return tp


def _accepts(tp: Any, value: Any) -> bool | None:
    """True or False where the annotation decides it, None where it is too rich to judge."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        verdict = _accepts(args[0], value)
        return all(c.holds(value) for c in _constraints(tp)) if verdict else verdict
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:  # (1 == True == 1.0: the type must match too)
        return any(value == a and type(value) is type(a) for a in args)
    if isinstance(value, DictConfig) and "_target_" in value:
        return None  # an object built from its own node
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in _SEQUENCES or tp in _SEQUENCES:
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        return _accepts_items(_item_type(origin, args), value)
    if origin in _MAPPINGS or tp in _MAPPINGS:
        if not isinstance(value, (dict, DictConfig)):
            return False
        return _accepts_items(args[1] if len(args) == 2 else None, value.values())
    return None


def _item_type(origin: Any, args: tuple[Any, ...]) -> Any:
    """What each item of a sequence must be; None where it is not one type (a fixed-length tuple)."""
    if origin is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else None
    return args[0] if args else None


def _accepts_items(item: Any, values: Iterable[Any]) -> bool | None:
    """Whether every item of a list (or value of a dict) is an `item`."""
    if item is None or item is Any:
        return True
    try:
        verdicts = [_accepts(item, v) for v in values]
    except OmegaConfBaseException:  # an item only a running job knows
        return None
    return False if False in verdicts else (None if None in verdicts else True)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        words = _describe(args[0])
        for constraint in _constraints(tp):
            words = constraint.describe(words)
        return words
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in _SEQUENCES and (item := _item_type(origin, args)) is not None:
        return f"list of {_describe(item)}"
    if origin in _MAPPINGS and len(args) == 2:
        return f"dict of {_describe(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"
