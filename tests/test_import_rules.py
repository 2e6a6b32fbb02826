"""The layering, held by parsing every module (imports inside functions included, which a deferred import to
dodge a cycle would be): stages are plain functions that import neither Prefect nor the flows; the schema
imports no stage; the package never imports the flows; the card templates are reached only through the card
stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtpress.archs import registered

ROOT = Path(__file__).resolve().parents[1]
# The command line and the demo start flow runs: they are the package's entry points, above the flows. Nothing
# else in mtpress may import them.
ENTRY_POINTS = {"mtpress.cli", "mtpress.demo.run"}
CARD_STAGES = {"mtpress.stages.card", "mtpress.stages.mlx_card"}
TEMPLATE_NAMES = {"TEMPLATES_DIR", "MLX_TEMPLATES_DIR"}
# What names an architecture: registered names and the HF classes they claim. Outside mtpress.archs (and the demo
# generators, which write checkpoints of a family) code asks the ArchSpec, never compares or keys on these.
ARCH_NAMES = {name for spec in registered().values() for name in (spec.name, *spec.hf_architectures)}


def modules() -> dict[str, Path]:
    """Every module of the package and of the flows, by dotted name."""
    found = {}
    for base, package in ((ROOT / "src", "mtpress"), (ROOT, "flows")):
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, tree: ast.AST, *, is_package: bool = False) -> list[set[str]]:
    """Each import statement anywhere in the module, as the dotted names it may bring in: ``from a import b``
    gives ``a`` and ``a.b`` (b may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    statements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements += [{alias.name} for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            statements.append({base, *(f"{base}.{alias.name}" for alias in node.names)})
    return statements


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _architecture_tests(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Comparisons with an architecture's name (``arch.name != "qwen35"``, ``in ("qwen35", …)``) and tables
    keyed by one (``{"qwen35": …}``)."""
    def names(node: ast.AST | None) -> list[str]:
        parts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return [p.value for p in parts if isinstance(p, ast.Constant) and p.value in ARCH_NAMES]

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [(node, n) for side in (node.left, *node.comparators) for n in names(side)]
        elif isinstance(node, ast.Dict):
            found += [(node, n) for key in node.keys for n in names(key)]
    return found


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """What in ``source`` (the text of ``module``) breaks the layering, one line per import; empty when nothing does."""
    tree = ast.parse(source)
    rules = []
    if _under(module, "mtpress.stages"):
        rules.append((lambda n: _under(n, "prefect") or _under(n, "flows"),
                      "stages are plain functions, composed as tasks by flows/"))
    if module == "mtpress.schema":
        rules.append((lambda n: _under(n, "mtpress.stages"),
                      "the schema holds every stage's spec and imports no stage"))
    if _under(module, "mtpress") and not _under(module, "mtpress.stages") and module not in ENTRY_POINTS:
        rules.append((lambda n: _under(n, "flows"), "the package never imports the flows built on it"))
    if module not in CARD_STAGES:
        rules.append((lambda n: _under(n, "jinja2") or n.rpartition(".")[2] in TEMPLATE_NAMES,
                      "the card templates are rendered by the card stage only"))
    found = [f"{module} imports {min(hits)}: {why}" for names in imports(module, tree, is_package=is_package)
             for breaks, why in rules if (hits := [n for n in names if breaks(n)])]
    if not (_under(module, "mtpress.archs") or _under(module, "mtpress.demo")):
        found += [f"{module} tests the architecture by name ({name!r}, line {node.lineno}): ask the ArchSpec"
                  for node, name in _architecture_tests(tree)]
    if module not in CARD_STAGES:
        found += [f"{module} names the templates folder ({node.value!r}): the card stage alone reaches it"
                  for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and (node.value == "templates" or node.value.startswith("templates/"))]
    return found


def test_every_module_keeps_the_layering():
    found = modules()
    assert {"mtpress.schema", "mtpress.stages.card", "mtpress.stages.smoke", "flows.publish"} <= set(found)
    problems = [problem for name, path in found.items() for problem in
                violations(name, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py")]
    assert problems == []


@pytest.mark.parametrize("module, source, problem", [
    ("mtpress.stages.smoke", "from prefect import task\n", "imports prefect: stages are plain functions"),
    ("mtpress.stages.bench", "def bench():\n    import prefect.artifacts\n", "imports prefect.artifacts"),
    ("mtpress.stages.gate", "def gate():\n    from flows.cache import StageCache\n", "imports flows.cache: stages"),
    ("mtpress.schema", "def spec():\n    from mtpress.stages.bench import BenchSpec\n",
     "imports mtpress.stages.bench: the schema holds every stage's spec"),
    ("mtpress.schema", "from mtpress import stages\n", "imports mtpress.stages:"),
    ("mtpress.schema", "from .stages.quality import QualitySpec\n", "imports mtpress.stages.quality:"),
    ("mtpress.watch", "def watch():\n    from flows.watch import watch\n", "the package never imports the flows"),
    ("flows.publish", "from jinja2 import Environment\n", "rendered by the card stage only"),
    ("flows.publish", "from mtpress.stages.card import TEMPLATES_DIR\n", "imports mtpress.stages.card.TEMPLATES_DIR:"),
    ("mtpress.stages.gate", "from pathlib import Path\nT = Path(__file__).parents[3] / 'templates' / 'card'\n",
     "names the templates folder ('templates')"),
    ("mtpress.stages.realign", "def f(arch):\n    if arch.name != 'qwen35':\n        raise ValueError\n",
     "tests the architecture by name ('qwen35', line 2)"),
    ("mtpress.stages.export_mlx", "IDS = {'qwen35moe': None}\n", "tests the architecture by name ('qwen35moe'"),
    ("flows.publish", "def f(c):\n    return c['architectures'][0] in ('Qwen3_5MoeForCausalLM',)\n",
     "tests the architecture by name ('Qwen3_5MoeForCausalLM'"),
])
def test_each_rule_catches_its_violation(module, source, problem):
    found = violations(module, source)
    assert len(found) == 1 and problem in found[0], found


def test_what_the_rules_allow():
    assert violations("mtpress.stages.card", "from jinja2 import FileSystemLoader\nT = 'templates'\n") == []
    assert violations("mtpress.cli", "def publish():\n    from flows.publish import publish\n") == []
    assert violations("flows.publish", "from prefect import flow\nfrom mtpress.stages.card import render_card\n") == []
    assert violations("mtpress.archs.qwen35moe", "IDS = {'qwen35moe': None}\n") == []
    assert violations("mtpress.schema", "arch: str = 'qwen35'\n") == []  # a default names, it does not test
