"""No module of quada imports from a higher layer.

Every import counts: at the top of a module, inside a function, under ``TYPE_CHECKING``, and
``importlib.import_module("quada...")``; an import by a computed name cannot be checked and fails.
"""

import ast
from pathlib import Path

import pytest

import quada

PACKAGE = Path(quada.__file__).parent

# Low to high. A module may import from its own layer and from the layers before it. A package
# or module name stands for everything under it; every ``cli`` module is at the top.
LAYERS = (
    ("base", ("errors", "runs", "hub", "devices", "chat", "data", "models", "store", "fingerprint", "testing",
              "seeds", "defaults")),
    ("measurement", ("approx", "measures", "stats", "judging", "backends", "options")),
    ("engine", ("engine",)),  # the plan of a command's measurements and the executors that run it
    ("report", ("report",)),
    ("analysis", ("analysis", "vet", "attack")),  # vet and attack are plans of conditions, like the analyses
    ("defense", ("defense",)),
    ("cli", ("cli", "__main__", "cli_options", "approx_cli")),
)
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}
CLI = len(LAYERS) - 1


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The rank of ``module`` (``quada.x.y``) in :data:`LAYERS`; the package itself is at the bottom."""
    parts = module.split(".")[1:]
    if not parts:
        return 0
    if parts[-1] == "cli":
        return CLI
    if parts[0] not in RANK:
        raise AssertionError(f"quada.{parts[0]} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return RANK[parts[0]]


def is_package(name: str) -> bool:
    return (PACKAGE.parent.joinpath(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py").is_file()


def imported(module: str, source: str) -> list[tuple[int, str]]:
    """``(line, quada module)`` of every import in ``source``; a dynamic import by a computed name
    is returned as ``(line, "?")``."""
    package = module if is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from quada.report import sweep`` imports the module quada.report.sweep.
            found += [(node.lineno, f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            argument = node.args[0] if node.args else None
            literal = isinstance(argument, ast.Constant) and isinstance(argument.value, str)
            found.append((node.lineno, argument.value if literal else "?"))
    return sorted((line, name) for line, name in found if name == "?" or name == "quada" or name.startswith("quada."))


def violations(module: str, source: str) -> list[str]:
    own = layer(module)
    out = []
    for line, name in imported(module, source):
        if name == "?":
            out.append(f"{module}:{line} imports a module by a computed name; import it by name")
        elif layer(name) > own:
            out.append(f"{module}:{line} imports {name} ({LAYERS[layer(name)][0]}) from the {LAYERS[own][0]} layer")
    return out


FILES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)


def test_the_walk_sees_the_whole_package():
    assert {"quada.cli", "quada.vet", "quada.report.story", "quada.measures.scoring", "quada.defense.quada"} <= set(MODULES)
    for module in MODULES:
        layer(module)  # every module belongs to a layer


def test_the_check_sees_imports_anywhere_in_a_module():
    source = (
        "from quada.errors import QuadaError\n"
        "from quada.report import sweep\n"
        "from . import scoring\n"
        "def f():\n"
        "    import quada.defense.quada\n"
        "    from ..analysis import layers\n"
        "    importlib.import_module('quada.cli')\n"
        "    importlib.import_module(name)\n"
    )
    assert [v.split(" ", 1)[0] for v in violations("quada.measures.generate", source)] == [
        "quada.measures.generate:2", "quada.measures.generate:5", "quada.measures.generate:6", "quada.measures.generate:7",
        "quada.measures.generate:8"]
    assert violations("quada.analysis.cli", source) == ["quada.analysis.cli:8 imports a module by a computed name; import it by name"]


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_higher_layer(module):
    assert violations(module, FILES[module].read_text()) == []
