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
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainer.errors import UserError


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
    hints = _type_hints(target)
    for key in node:
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {where}.{close[0]}?" if close else f"valid keys: {', '.join(params)}"
            raise UserError(f"{where}.{key} is not an option of {_name(target)}: {hint}")
        if key in hints and _accepts(hints[key], node[key]) is False:
            raise UserError(
                f"{where}.{key}={OmegaConf.to_container(node, resolve=True)[key]!r} has the wrong type: "
                f"expected {_describe(hints[key])}"
            )


def _type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # unresolvable forward references: check keys only
        return {}


def _accepts(tp: Any, value: Any) -> bool | None:
    """True or False where the annotation decides it, None where it is too rich to judge."""
    origin = typing.get_origin(tp)
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
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"
