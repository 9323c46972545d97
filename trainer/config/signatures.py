"""A `_target_`'s parameters read from its source, without importing it.

Checking a config must not cost the imports of what it configures (Lightning alone takes seconds), so the
check reads the `__init__` of a class (or the fields of a dataclass, or what a class inherits), or a
function, straight from the module's file with `ast`; a class whose `__init__` passes `**kwargs` on to
`super().__init__` takes its base's parameters too. Where the source does not say plainly (a base class
behind a subscript, a compiled module), the check imports the target instead. Annotations are evaluated
against a fixed set of names only (and the module's own aliases of them, `Mode = Literal["a", "b"]`), so no
code of the target runs; a type naming anything else is left unchecked. A class attribute written as a
literal (a task's `validation_metrics`) is read the same way. A dataclass's field typed with another
dataclass of its module (`spike: SpikeSettings`) is `Nested`: its node is checked as one of its own.
"""

import ast
import functools
import importlib.util
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ranges

# What annotations are evaluated against; any other name makes that parameter's type unknown (unchecked).
NAMES: dict[str, Any] = {
    **{name: getattr(typing, name) for name in ("Any", "Optional", "Union", "Literal", "Annotated")},
    "int": int, "float": float, "str": str, "bool": bool, "None": None, "list": list, "dict": dict,
    "tuple": tuple, "Sequence": Sequence, "Mapping": Mapping, "List": list, "Dict": dict, "Tuple": tuple,
    # the range vocabulary (`lr: PositiveFloat`) and its constraints (`Annotated[int, Interval(low=8)]`)
    **{name: getattr(ranges, name) for name in (
        "Interval", "PowerOfTwo", "Matches", "Positive", "NonNegative", "Seed", "PositiveOrMinusOne",
        "NonNegativeOrMinusOne", "PositiveFloat", "NonNegativeFloat", "FiniteFloat", "Fraction",
        "FractionBelowOne", "FractionAboveZero", "SlurmTime", "Partition", "SyncMode",
    )},
}  # fmt: skip
UNKNOWN = object()
MISSING = object()  # (class_attribute: no class assigns it)


@dataclass(frozen=True)
class Nested:
    """The type of a settings field that is settings of its own: a dataclass of the same module."""

    target: str  # module.Class


@dataclass
class SourceSignature:
    names: list[str]  # parameters that a config may set (self excluded)
    takes_any: bool  # **kwargs
    hints: dict[str, Any]  # name -> type, for the annotations that evaluate against NAMES


def module_file(module: str) -> Path | None:
    """The file of a module, found without importing it or its packages."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
    if spec is None or (not spec.submodule_search_locations and rest):
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for folder in spec.submodule_search_locations or []:
        base = Path(folder).joinpath(*rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@functools.cache  # (a sweep checks every trial's config; the files do not change while it runs)
def source_signature(target: str, depth: int = 0) -> SourceSignature | None:
    """The parameters of `module.Class` (its `__init__`, a dataclass's fields, or what it inherits from its
    first base) or `module.function`, following re-exports (`from .x import Name`); None where the source
    does not say plainly."""
    found = _definition(target, depth)
    if found is None:
        return None
    definition, tree, module, path, depth = found
    namespace = {**NAMES, **_aliases(tree)}
    if isinstance(definition, ast.FunctionDef):
        return _parameters(definition.args, skip=0, namespace=namespace)
    if not isinstance(definition, ast.ClassDef):
        return None
    init = next((n for n in definition.body if getattr(n, "name", None) == "__init__"), None)
    if isinstance(init, ast.FunctionDef):
        own = _parameters(init.args, skip=1, namespace=namespace)  # (self)
        if not (own.takes_any and _passes_kwargs_to_base(init)):
            return own
        inherited = _base_signature(definition, tree, module, path, depth)
        return _extended(own, inherited) if inherited else own
    if _is_dataclass(definition):
        fields = [
            (n.target.id, n.annotation)
            for n in definition.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        ]
        inherited = _base_signature(definition, tree, module, path, depth)
        names = [*(inherited.names if inherited else []), *(name for name, _ in fields)]
        hints = {**(inherited.hints if inherited else {})}
        namespace.update(_nested_settings(tree, module))
        hints.update(
            {
                name: tp
                for name, annotation in fields
                if (tp := _evaluate(annotation, namespace)) is not UNKNOWN
            }
        )
        return SourceSignature(names, False, hints)
    return _base_signature(definition, tree, module, path, depth)


@functools.cache
def class_attribute(target: str, name: str, depth: int = 0) -> Any:
    """The literal value (`("val/f1",)`) that the class `module.Class`, or the nearest class it inherits from
    along first bases, assigns to `name` in its body, read from source; MISSING where no class of the chain
    assigns it, UNKNOWN where the source does not say plainly (not a literal, a base it cannot follow)."""
    found = _definition(target, depth)
    if found is None:
        return UNKNOWN
    definition, tree, module, path, depth = found
    if not isinstance(definition, ast.ClassDef):
        return UNKNOWN
    for node in definition.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            try:
                return ast.literal_eval(node.value)
            except (ValueError, TypeError):  # not a literal
                return UNKNOWN
    base = _first_base(definition, tree, module, path)
    if base is None:
        return UNKNOWN
    return class_attribute(base, name, depth + 1) if base else MISSING


def _definition(target: str, depth: int) -> tuple[ast.stmt, ast.Module, str, Path, int] | None:
    """The statement that defines `module.Name` (following re-exports, `from .x import Name`), its module's
    tree, name and file, and the depth the search reached; None where no source is found."""
    module, _, name = target.rpartition(".")
    path = module_file(module) if module and depth < 8 else None
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    definition = next((n for n in tree.body if getattr(n, "name", None) == name), None)
    if definition is not None:
        return definition, tree, module, path, depth
    origin = _imported_from(tree, name, module, path)  # imported into this module from another: follow it
    return _definition(origin, depth + 1) if origin else None


def _parameters(args: ast.arguments, skip: int, namespace: dict[str, Any]) -> SourceSignature:
    params = [*args.posonlyargs, *args.args][skip:] + args.kwonlyargs
    hints = {
        p.arg: tp
        for p in params
        if p.annotation is not None and (tp := _evaluate(p.annotation, namespace)) is not UNKNOWN
    }
    return SourceSignature([p.arg for p in params], args.kwarg is not None, hints)


def _is_dataclass(definition: ast.ClassDef) -> bool:
    return any(ast.unparse(d).split("(")[0].endswith("dataclass") for d in definition.decorator_list)


def _nested_settings(tree: ast.Module, module: str) -> dict[str, Nested]:
    """The module's dataclasses, as the types of fields that are settings of their own."""
    return {
        node.name: Nested(f"{module}.{node.name}")
        for node in tree.body
        if isinstance(node, ast.ClassDef) and _is_dataclass(node)
    }


def _passes_kwargs_to_base(init: ast.FunctionDef) -> bool:
    """Whether `__init__(self, ..., **kwargs)` calls `super().__init__(..., **kwargs)`: then the base's
    parameters are this class's too, and a config may set (and must spell right) any of them."""
    kwargs = init.args.kwarg.arg if init.args.kwarg else None
    return any(
        isinstance(call, ast.Call)
        and ast.unparse(call.func) == "super().__init__"
        and any(k.arg is None and ast.unparse(k.value) == kwargs for k in call.keywords)
        for call in ast.walk(init)
    )


def _extended(own: SourceSignature, inherited: SourceSignature) -> SourceSignature:
    names = [*own.names, *(n for n in inherited.names if n not in own.names)]
    return SourceSignature(names, inherited.takes_any, {**inherited.hints, **own.hints})


def _aliases(tree: ast.Module) -> dict[str, Any]:
    """The module's type aliases built from NAMES (`Sharding = Literal["FULL_SHARD", ...]`). Only subscripts
    and unions are evaluated: no other expression of the module runs."""
    found = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, (ast.Subscript, ast.BinOp))
            and all(isinstance(op, ast.BitOr) for op in ast.walk(node.value) if isinstance(op, ast.operator))
            and (tp := _evaluate(node.value, NAMES)) is not UNKNOWN
        ):
            found[node.targets[0].id] = tp
    return found


def _base_signature(
    definition: ast.ClassDef, tree: ast.Module, module: str, path: Path, depth: int
) -> SourceSignature | None:
    """What a class without its own `__init__` inherits: its first base's (a plain class: nothing)."""
    base = _first_base(definition, tree, module, path)
    if base == "":
        return SourceSignature([], False, {})
    return source_signature(base, depth + 1) if base else None


def _first_base(definition: ast.ClassDef, tree: ast.Module, module: str, path: Path) -> str | None:
    """Where a class's first base is defined, as `module.Class`; "" for a class without bases, None where the
    source does not say."""
    if not definition.bases:
        return ""
    base = ast.unparse(definition.bases[0])
    if "[" in base:  # `Generic[T]`: too far to follow here
        return None
    if "." in base:  # `L.Callback`, after `import lightning as L`
        alias, _, attribute = base.partition(".")
        imported = next(
            (
                a.name
                for n in tree.body
                if isinstance(n, ast.Import)
                for a in n.names
                if (a.asname or a.name) == alias
            ),
            None,
        )
        return f"{imported}.{attribute}" if imported else None
    local = next((n for n in tree.body if getattr(n, "name", None) == base), None)
    return f"{module}.{base}" if local is not None else _imported_from(tree, base, module, path)


def _imported_from(tree: ast.Module, name: str, module: str, path: Path) -> str | None:
    """`package.module.Name` for a `from ... import Name` at the top of the module, relative ones included,
    or in a top-level `if` (a package's `if TYPE_CHECKING:` imports of the names it exports lazily)."""
    blocks = [node.body for node in tree.body if isinstance(node, ast.If)]
    for node in [*tree.body, *(statement for block in blocks for statement in block)]:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            if node.level:  # relative to this module's package
                package = module.split(".")
                package = package[: len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
                source = ".".join([*package, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            return f"{source}.{original}"
    return None


def _evaluate(annotation: ast.expr, namespace: dict[str, Any]) -> Any:
    text = ast.unparse(annotation)
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        text = annotation.value  # a string annotation
    try:  # names limited to NAMES and aliases of them: no code of the target runs
        tp = eval(text, {"__builtins__": {}}, namespace)
    except Exception:
        return UNKNOWN
    return UNKNOWN if _names_a_class(tp) else tp


def _names_a_class(tp: Any) -> bool:
    """Whether a type mentions a class by name ("pl.Accelerator"), which only importing would resolve."""
    if typing.get_origin(tp) is typing.Literal:
        return False  # its strings are values, not names
    return isinstance(tp, (str, typing.ForwardRef)) or any(_names_a_class(a) for a in typing.get_args(tp))
