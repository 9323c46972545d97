"""A `_target_`'s parameters read from its source, without importing it.

Checking a config must not cost the imports of what it configures (Lightning alone takes seconds), so the
check reads the `__init__` of a class (or the fields of a dataclass, or what a class inherits), or a
function, straight from the module's file with `ast`. Where the source does not say plainly (a base class
behind a subscript, a compiled module), the check imports the target instead. Annotations are evaluated
against a fixed set of names only, so no code of the target runs; a type naming anything else is left
unchecked.
"""

import ast
import importlib.util
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.ranges import NonNegative, Positive

# What annotations are evaluated against; any other name makes that parameter's type unknown (unchecked).
NAMES: dict[str, Any] = {
    **{name: getattr(typing, name) for name in ("Any", "Optional", "Union", "Literal", "Annotated")},
    "int": int, "float": float, "str": str, "bool": bool, "None": None, "list": list, "dict": dict,
    "tuple": tuple, "Sequence": Sequence, "Mapping": Mapping, "List": list, "Dict": dict, "Tuple": tuple,
    "Positive": Positive, "NonNegative": NonNegative,
}  # fmt: skip
UNKNOWN = object()


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


def source_signature(target: str, depth: int = 0) -> SourceSignature | None:
    """The parameters of `module.Class` (its `__init__`, a dataclass's fields, or what it inherits from its
    first base) or `module.function`, following re-exports (`from .x import Name`); None where the source
    does not say plainly."""
    module, _, name = target.rpartition(".")
    path = module_file(module) if module and depth < 8 else None
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    definition = next((n for n in tree.body if getattr(n, "name", None) == name), None)
    if definition is None:  # imported into this module from another: follow it
        origin = _imported_from(tree, name, module, path)
        return source_signature(origin, depth + 1) if origin else None
    if isinstance(definition, ast.FunctionDef):
        return _parameters(definition.args, skip=0)
    if not isinstance(definition, ast.ClassDef):
        return None
    init = next((n for n in definition.body if getattr(n, "name", None) == "__init__"), None)
    if isinstance(init, ast.FunctionDef):
        return _parameters(init.args, skip=1)  # self
    if any(ast.unparse(d).split("(")[0].endswith("dataclass") for d in definition.decorator_list):
        fields = [
            n for n in definition.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        ]
        inherited = _base_signature(definition, tree, module, path, depth)
        names = [*(inherited.names if inherited else []), *(f.target.id for f in fields)]
        hints = {**(inherited.hints if inherited else {})}
        hints.update({f.target.id: tp for f in fields if (tp := _evaluate(f.annotation)) is not UNKNOWN})
        return SourceSignature(names, False, hints)
    return _base_signature(definition, tree, module, path, depth)


def _parameters(args: ast.arguments, skip: int) -> SourceSignature:
    params = [*args.posonlyargs, *args.args][skip:] + args.kwonlyargs
    hints = {
        p.arg: tp
        for p in params
        if p.annotation is not None and (tp := _evaluate(p.annotation)) is not UNKNOWN
    }
    return SourceSignature([p.arg for p in params], args.kwarg is not None, hints)


def _base_signature(
    definition: ast.ClassDef, tree: ast.Module, module: str, path: Path, depth: int
) -> SourceSignature | None:
    """What a class without its own `__init__` inherits: its first base's (a plain class: nothing)."""
    if not definition.bases:
        return SourceSignature([], False, {})
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
        return source_signature(f"{imported}.{attribute}", depth + 1) if imported else None
    local = next((n for n in tree.body if getattr(n, "name", None) == base), None)
    origin = f"{module}.{base}" if local is not None else _imported_from(tree, base, module, path)
    return source_signature(origin, depth + 1) if origin else None


def _imported_from(tree: ast.Module, name: str, module: str, path: Path) -> str | None:
    """`package.module.Name` for a `from ... import Name` at the top of the module, relative ones included."""
    for node in tree.body:
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


def _evaluate(annotation: ast.expr) -> Any:
    text = ast.unparse(annotation)
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        text = annotation.value  # a string annotation
    try:
        tp = eval(text, {"__builtins__": {}}, NAMES)  # names limited to NAMES: no code of the target runs
    except Exception:
        return UNKNOWN
    return UNKNOWN if _names_a_class(tp) else tp


def _names_a_class(tp: Any) -> bool:
    """Whether a type mentions a class by name ("pl.Accelerator"), which only importing would resolve."""
    return isinstance(tp, (str, typing.ForwardRef)) or any(_names_a_class(a) for a in typing.get_args(tp))
