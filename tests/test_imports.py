"""Imports flow downwards: no module uses another module's private names, and the lower layers never import the
upper ones (``core/`` is pure math, ``adapters/`` knows models but not the pipeline, the Hub or the CLI).

The source is read with ``ast``, so imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

import hf_clafusion


PACKAGE = Path(hf_clafusion.__file__).parent
UPPER = {"hf_clafusion.api", "hf_clafusion.fusion", "hf_clafusion.hub", "hf_clafusion.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_module(node: ast.ImportFrom, importer: str, importer_is_package: bool) -> str:
    """The absolute name of the module ``from <...> import`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if importer_is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(source: str, importer: str, importer_is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """Every ``(module, name or None, line)`` imported from hf_clafusion by the source (``import m`` gives None)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("hf_clafusion")]
        elif isinstance(node, ast.ImportFrom):
            module = imported_module(node, importer, importer_is_package)
            if module.startswith("hf_clafusion"):
                found += [(module, a.name, node.lineno) for a in node.names]
    return found


def private_uses(source: str, importer: str, importer_is_package: bool = False) -> list[str]:
    """``module._name`` imports and attribute reads of another hf_clafusion module's private names."""
    problems, module_aliases = [], {}
    for module, name, line in imports(source, importer, importer_is_package):
        target = module if name is None else f"{module}.{name}"
        if name is not None and is_private(name) and not is_module(target):
            problems.append(f"{importer}:{line} imports {name} from {module}")
    tree = ast.parse(source)
    for node in ast.walk(tree):  # names bound to hf_clafusion modules: `from . import hub`, `import x.y as y`
        if isinstance(node, ast.ImportFrom):
            module = imported_module(node, importer, importer_is_package)
            for alias in node.names:
                if module.startswith("hf_clafusion") and is_module(f"{module}.{alias.name}"):
                    module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_clafusion") and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and is_private(node.attr)
        ):
            problems.append(f"{importer}:{node.lineno} reads {module_aliases[node.value.id]}.{node.attr}")
    return problems


MODULES = sorted(PACKAGE.rglob("*.py"))


def read(path: Path) -> tuple[str, str, bool]:
    return path.read_text(), module_name(path), path.name == "__init__.py"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_uses(*read(path)) == []


@pytest.mark.parametrize(
    "path",
    sorted((PACKAGE / "core").rglob("*.py")) + sorted((PACKAGE / "adapters").rglob("*.py")),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_core_and_adapters_never_import_the_pipeline_the_hub_or_the_cli(path):
    source, name, package = read(path)
    upward = [
        f"line {line}: {module}" + (f".{imported}" if imported else "")
        for module, imported, line in imports(source, name, package)
        if any(module == upper or module.startswith(upper + ".") for upper in UPPER)
        or (imported is not None and f"{module}.{imported}" in UPPER)
    ]
    assert upward == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_model_knowledge(path):
    source, name, package = read(path)
    modules = {module for module, _, _ in imports(source, name, package)}
    assert {m for m in modules if m.startswith(("hf_clafusion.adapters", "hf_clafusion.spec"))} == set()


def test_the_checks_find_private_and_upward_imports():
    """The checks above are only worth something if they flag what they look for."""
    source = "from ..api import _download\nfrom . import base\nbase._REGISTRY\nfrom .._data import move_to\n"
    assert private_uses(source, "hf_clafusion.adapters.timm") == [
        "hf_clafusion.adapters.timm:1 imports _download from hf_clafusion.api",
        "hf_clafusion.adapters.timm:3 reads hf_clafusion.adapters.base._REGISTRY",
    ]
    assert ("hf_clafusion.api", "_download", 1) in imports(source, "hf_clafusion.adapters.timm")
    assert private_uses("from . import __version__\nfrom .adapters import find_loader\n", "hf_clafusion.hub") == []
