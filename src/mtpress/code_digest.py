"""What code made a result: a digest of a module's source and of every mtpress module it imports.

A cached stage result is reused only if the code that made it is unchanged. The package version does
not say that (it stays 0.1.0 while stages change), so keys carry a digest of the stage's own source
files instead: its module, the mtpress modules it imports (at any depth, deferred imports included), and
scripts it runs in other interpreters. A change to the card template or the CLI leaves a 9B conversion
reusable; a change to the converter's wrapper, the schema or the toolchain module does not.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

# Scripts a stage runs under another Python (the converter's or the MLX tools' environment): no import
# statement leads to them, so the stage's module names them here.
RUNS_SCRIPTS = {
    "mtpress.stages.realign": ("mtpress.realign_trainer",),
    "mtpress.toolchain.mlx": ("mtpress.toolchain.mlx_runner",),
}


def code_digest(module: str, package: str = "mtpress") -> str:
    """sha256 over the sources of ``module`` and every ``package`` module it reaches by import."""
    h = hashlib.sha256()
    for name in sorted(_closure(module, package)):
        h.update(f"{name}\0".encode())
        h.update(_source(name).read_bytes())
    return h.hexdigest()


def _closure(module: str, package: str) -> set[str]:
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending += [m for m in _imports(name) if m == package or m.startswith(f"{package}.")]
        pending += RUNS_SCRIPTS.get(name, ())
    return seen


def _imports(module: str) -> set[str]:
    """Modules ``module`` imports, resolved to the deepest name that is a module (``from a import b`` may
    import the submodule ``a.b`` or a name defined in ``a``)."""
    source = _source(module)
    is_package = source.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(source.read_bytes(), filename=str(source))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + int(is_package)]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")}
    return {name for name in found if name and _is_module(name)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no source for module {module}")
    return Path(spec.origin)
