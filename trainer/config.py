"""Building objects from config nodes, with errors that name the key and the fix.

`hydra.utils.instantiate` reports a wrong key or a wrong type as a long traceback from deep inside the
target, often only when training is under way. `build` checks the node against the target's signature
first: unknown keys (with the closest valid name) and values whose type contradicts a plain annotation
(int, float, bool, str, Literal, Optional and unions of those) are refused before anything runs.
"""

import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import UserError
from trainer.ranges import AtLeast
from trainer.signatures import source_signature


def build(node: DictConfig, where: str, **kwargs: Any) -> Any:
    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception:
        raise UserError(
            f"{where}._target_={target} cannot be imported: check the module and class name"
        ) from None
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


def check_arguments(target: Any, node: DictConfig, where: str) -> None:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    _check_node(node, where, _name(target), list(params), takes_any, _type_hints(target))


def _check_node(
    node: DictConfig, where: str, target: str, params: list[str], takes_any: bool, hints: dict[str, Any]
) -> None:
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {where}.{close[0]}?" if close else f"valid keys: {', '.join(params)}"
            raise UserError(f"{where}.{key} is not an option of {target}: {hint}")
        if key in hints and (value := _resolved(node, key)) is not _UNRESOLVED:
            _check_value(f"{where}.{key}", hints[key], value)


_UNRESOLVED = object()


def _resolved(node: DictConfig, key: str) -> Any:
    """The value, or _UNRESOLVED where it interpolates what only a running job knows (`--cfg` checks a config
    before Hydra has made its run dir)."""
    try:
        return node[key]
    except OmegaConfBaseException:
        return _UNRESOLVED


def _check_value(key: str, tp: Any, value: Any) -> None:
    if _accepts(tp, value) is False:
        shown = (
            OmegaConf.to_container(value, resolve=True)
            if isinstance(value, (DictConfig, ListConfig))
            else value
        )
        problem = "is out of range" if _accepts(_base(tp), value) else "has the wrong type"
        raise UserError(f"{key}={shown!r} {problem}: expected {_describe(tp)}")


# The top-level keys of conf/config.yaml that the code reads as plain values.
TOP_LEVEL = {
    "seed": int,
    "name": str,
    "mode": typing.Literal["train", "lr_find", "tune"],
    "resume": typing.Literal["auto", "never"],
    "ckpt_path": str | None,
    "group": str | None,
}


def check_config(cfg: DictConfig) -> None:
    """The whole composed config, before anything runs or is submitted: the top-level keys' types, and every
    `_target_` node (task, model, data, trainer, callbacks, loggers, launcher, ...) against its target's
    signature, value ranges included."""
    for key, tp in TOP_LEVEL.items():
        if key in cfg and (value := _resolved(cfg, key)) is not _UNRESOLVED:
            _check_value(key, tp, value)
    if "monitor" in cfg:
        _check_value("monitor.mode", typing.Literal["min", "max"], cfg.monitor.mode)
    for where, node in _target_nodes(cfg, ""):
        target = str(node._target_)
        if (source := source_signature(target)) is not None:  # read, not imported: fast
            _check_node(node, where, target, source.names, source.takes_any, source.hints)
            continue
        try:
            obj = get_object(target)
        except Exception:
            raise UserError(
                f"{where}._target_={target} cannot be imported: check the module and class name"
            ) from None
        check_arguments(obj, node, where)


def _target_nodes(node: DictConfig, where: str) -> list[tuple[str, DictConfig]]:
    found = [(where, node)] if "_target_" in node and where else []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += _target_nodes(child, f"{where}.{key}" if where else str(key))
    return found


def _type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # unresolvable forward references: check keys only
        return {}


def _base(tp: Any) -> Any:
    """The type without its range (`Annotated[int, AtLeast(1)]` -> int)."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _accepts(tp: Any, value: Any) -> bool | None:
    """True or False where the annotation decides it, None where it is too rich to judge."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        verdict = _accepts(_base(tp), value)
        floors = [m.minimum for m in tp.__metadata__ if isinstance(m, AtLeast)]
        return False if verdict and any(value < floor for floor in floors) else verdict
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(tp)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
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
    if origin in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple, ListConfig))
    if origin in (dict, Mapping, typing.Mapping):
        return isinstance(value, (dict, DictConfig))
    return None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        floors = [f" >= {m.minimum:g}" for m in tp.__metadata__ if isinstance(m, AtLeast)]
        return _describe(_base(tp)) + "".join(floors)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"
