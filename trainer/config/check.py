"""The whole composed config checked at once, before anything runs or is submitted: every node that
configures a class against its signature (config/build.py), with the ranges of config/ranges.py, so that a
value out of range is one line before any run dir, cluster or job exists; the plain keys (PLAIN); and
`monitor.metric` against the metrics the task declares it logs."""

import difflib
import string
import typing
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainer.config.build import (
    UNRESOLVED,
    check_node,
    check_value,
    import_target,
    imported_signature,
    refuse,
    resolved,
    set_as,
)
from trainer.config.ranges import EXTERNAL_RANGES, RULES, Seed
from trainer.config.signatures import (
    MISSING,
    UNKNOWN,
    Nested,
    SourceSignature,
    class_attribute,
    source_signature,
)
from trainer.errors import UserError

# The keys of conf/config.yaml that the code reads as plain values, not as a target's parameters.
PLAIN = {
    "seed": Seed,
    "name": str,
    "mode": typing.Literal["train", "lr_find", "tune"],
    "resume": typing.Literal["auto", "never", "force"],
    "ckpt_path": str | None,
    "group": str | None,
    "monitor": {"mode": typing.Literal["min", "max"]},
    "metrics": {"modes": dict[str, typing.Literal["min", "max"] | None] | None},  # callbacks/metrics.py
    "perf": {  # trainer/run.py
        "compile": bool,
        "compile_backend": str,
        "compile_mode": typing.Literal[
            "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
        ]
        | None,
        "channels_last": bool,
        "matmul_precision": typing.Literal["highest", "high", "medium"] | None,
    },
}


# Nodes without a `_target_` that the code reads as the parameters of a class: checked against it, and each
# node in them that is settings of its own (`divergence.spike`) against its class.
SETTINGS = {
    "slurm": "trainer.launchers.slurm.SlurmJob",
    "tune": "trainer.sweeps.tune.TuneSettings",
    "lr_find": "trainer.divergence.lr_find.LRRangeTest",
    "divergence": "trainer.divergence.settings.DivergenceSettings",
    "distributed": "trainer.distributed.settings.DistributedSettings",
}


def check_config(cfg: DictConfig) -> None:
    """The whole composed config, before anything runs or is submitted: the plain keys (PLAIN), and every node
    that configures a class (task, model, data, trainer, callbacks, loggers, launcher, slurm, ...) against its
    signature: keys, types, ranges (trainer/config/ranges.py: in the signature, or EXTERNAL_RANGES) and
    RULES."""
    _check_plain(cfg, PLAIN, "")
    _check_monitor(cfg)
    perf = cfg.get("perf") or {}
    if perf.get("compile"):
        from trainer.perf.compiling import check_compile  # (imports torch)

        check_compile(perf["compile_backend"], perf.get("compile_mode"))
    for where, node, target in config_nodes(cfg):
        if (signature := target_signature(target, where)) is not None:
            check_node(node, where, target, signature)
        _check_rules(node, where, target)


def config_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig, str]]:
    """(path, node, target) of every node that configures a class: the `_target_` nodes and SETTINGS'."""
    found = [(where, node, str(node._target_)) for where, node in _target_nodes(cfg, "")]
    for key, target in SETTINGS.items():
        if isinstance(cfg.get(key), DictConfig):
            found += _settings_nodes(key, cfg[key], target)
    return found


def _settings_nodes(where: str, node: DictConfig, target: str) -> list[tuple[str, DictConfig, str]]:
    """A settings node, and within it each node whose field is settings of its own (`Nested`)."""
    found = [(where, node, target)]
    signature = target_signature(target, where)
    for key, tp in signature.hints.items() if signature is not None else []:
        if isinstance(tp, Nested) and isinstance(child := node.get(key), DictConfig):
            found += _settings_nodes(f"{where}.{key}", child, tp.target)
    return found


def target_signature(target: str, where: str) -> SourceSignature | None:
    """What check_config holds a node of `target` to: its parameters and their types (read from source where
    it says plainly, else imported), with EXTERNAL_RANGES for classes the project does not own."""
    signature = source_signature(target)  # read, not imported: fast
    if signature is None:
        signature = imported_signature(import_target(target, where))
    if signature is not None and target in EXTERNAL_RANGES:
        signature = replace(signature, hints={**signature.hints, **EXTERNAL_RANGES[target]})
    return signature


def _check_monitor(cfg: DictConfig) -> None:
    """`monitor.metric` against the metrics the task declares that its validation logs
    (`Task.validation_metrics`), before training rather than at the first validation. Left to that first
    validation: tasks that declare none, and train/ metrics (the step's report names them as it runs)."""
    monitor, task = cfg.get("monitor"), cfg.get("task")
    if not (isinstance(monitor, DictConfig) and isinstance(task, DictConfig) and "_target_" in task):
        return
    metric = resolved(monitor, "metric")
    if not isinstance(metric, str) or metric.startswith("train/"):
        return
    target = str(task._target_)
    declared = class_attribute(target, "validation_metrics")
    if declared is UNKNOWN:  # the source does not say plainly: the class does
        declared = getattr(import_target(target, "task"), "validation_metrics", ())
    if declared is MISSING or not declared or metric in declared:
        return
    close = difflib.get_close_matches(metric, declared, n=1)
    hint = f"did you mean monitor.metric={close[0]}?" if close else "set monitor.metric to one of those"
    raise UserError(
        f"monitor.metric={metric} is never logged by {target} (its validation logs "
        f"{', '.join(declared)}): {hint}"
    )


def _check_plain(node: DictConfig, table: Mapping[str, Any], prefix: str) -> None:
    for key, tp in table.items():
        if key not in node:
            continue
        if isinstance(tp, Mapping):
            if isinstance(child := node[key], DictConfig):
                _check_plain(child, tp, f"{prefix}{key}.")
        elif (value := resolved(node, key)) is not UNRESOLVED:
            check_value(f"{prefix}{key}", tp, value)


def _check_rules(node: DictConfig, where: str, target: str) -> None:
    for rule in RULES:
        if rule.target != target:
            continue
        fields = [field for _, field, _, _ in string.Formatter().parse(rule.expected) if field]
        try:
            if rule.holds(node):
                continue
            words = {field: where if field == "where" else node[field] for field in fields}
        except OmegaConfBaseException:  # a value only a running job knows
            continue
        refuse(
            set_as(node, rule.key, f"{where}.{rule.key}"),
            node[rule.key],
            "is out of range",
            rule.expected.format_map(words),
        )


def _target_nodes(node: DictConfig, where: str) -> list[tuple[str, DictConfig]]:
    found = [(where, node)] if "_target_" in node and where else []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += _target_nodes(child, f"{where}.{key}" if where else str(key))
    return found
