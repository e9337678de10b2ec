"""The package's layout as README and each folder's __init__ describe it, read from the code's own imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stratos_lite"

# What each folder may import, as its __init__ docstring says ("config" is the settings, stratos_lite/config.py).
MAY_IMPORT = {
    "storage": set(),
    "model": {"storage"},
    "config": {"model", "storage"},
    "data": {"config", "model", "storage"},
    "export": {"data", "model", "storage"},
    "train": {"config", "data", "model", "storage"},
    "planning": {"config", "data", "model", "storage", "train"},
    "evaluation": {"data", "model", "storage", "train"},
    "demo": {"config", "data", "evaluation", "export", "model", "planning", "storage", "train"},
}
LONGEST_MODULE = 400  # lines


def modules() -> dict[str, Path]:
    """Every module of the package by its import name (a folder's __init__.py by the folder's)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, at_module_level: bool) -> set[str]:
    """The package's modules `name` imports (all, or only those at module level outside TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    nodes = [node for node in (tree.body if at_module_level else ast.walk(tree))
             if isinstance(node, ast.ImportFrom | ast.Import)]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            candidates = [alias.name for alias in node.names]
        found |= {c for c in candidates if c.split(".")[0] == "stratos_lite"}
    return found


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_folder_imports_only_the_folders_below_it():
    wrong = set()
    for name, path in modules().items():
        own = folder(name)
        if own not in MAY_IMPORT:  # the commands, the package's __init__ and __main__: the top
            continue
        for target in imported(name, path, at_module_level=False):
            other = folder(target)
            if other and other != own and other in {*MAY_IMPORT, "commands"} and other not in MAY_IMPORT[own]:
                wrong.add(f"{name} imports {other}")
    assert not wrong, sorted(wrong)


def test_no_import_circle_between_modules():
    known = modules()
    graph = {name: {t for t in imported(name, path, at_module_level=True) if t in known and t != name}
             for name, path in known.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in known:
        if name not in state:
            visit(name, [])


def test_no_module_is_longer_than_a_reader_holds():
    long = {name: count for name, path in modules().items()
            if (count := len(path.read_text().splitlines())) > LONGEST_MODULE}
    assert not long, long


def test_tests_benchmarks_and_tools_use_only_public_names():
    private = []
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tools/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stratos_lite"):
                private += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, private


def test_readme_layout_names_every_folder_of_the_package():
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"^  (\w+)/", tree, re.MULTILINE))
    folders = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert named == folders
    for name in folders:
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), f"{name}/__init__.py"


def test_the_package_points_at_nothing_an_installed_copy_lacks():
    """What the library prints or says carries its reasons: an installed package has no benchmarks/ (its
    RESULTS.md) and no ../shared beside it."""
    pointing = [f"{path.relative_to(ROOT)}: {word}" for path in PACKAGE.rglob("*")
                if path.suffix in {".py", ".toml", ".md", ".json"}
                for word in ("benchmarks/", "RESULTS.md", "../shared") if word in path.read_text()]
    assert not pointing, pointing
