"""Configs as plain data, typed: what `OmegaConf.to_container` makes of a DictConfig (its declared result is
any container, a string or None, with keys of any type)."""

from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain_dict(node: DictConfig | ListConfig, resolve: bool = True) -> dict[str, Any]:
    """A DictConfig (a mapping: not a ListConfig) as plain dicts and lists, interpolations resolved unless
    `resolve` is False."""
    container = OmegaConf.to_container(node, resolve=resolve)
    if not isinstance(container, dict):
        raise TypeError(f"expected a mapping, got {type(node).__name__}")
    return cast(dict[str, Any], container)  # (the keys of the project's configs are names)
