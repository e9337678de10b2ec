"""The docs stay true: README.md and docs/ link only to what exists, name only commands and settings that exist,
document every setting and public name (with its parameters), and their Python examples run as written on a
tiny model."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
from train_child import save_base

import stratos_lite as sl
from stratos_lite.commands import COMMANDS
from stratos_lite.demo.config import DemoConfig

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = [page for page in PAGES if page.parent.name == "docs"]
SETTINGS = {field.name for field in dataclasses.fields(sl.TrainConfig)}
DEMO_SETTINGS = {field.name for field in dataclasses.fields(DemoConfig)}
NOT_RUN = "<!-- not run:"  # put on the line before a Python example that cannot run on a CPU, with the reason


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def anchors(page: Path) -> set[str]:
    """The fragment each heading of a markdown page gets (GitHub's rule: lower case, punctuation dropped)."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text_of(page), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", text_of(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link {target!r} leads nowhere"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors(linked), f"{page.name}: link {target!r}: no such heading"


def named_settings(text: str) -> set[str]:
    """Settings a page names: `--set key=value`, `key = value` in inline code, and keys of TOML blocks."""
    names = set(re.findall(r"--set (\w+)=", text)) | set(re.findall(r"`(\w+) = [^`]+`", text))
    for block in re.findall(r"```toml\n(.*?)```", text, re.DOTALL):
        names |= set(re.findall(r"^(\w+) =", block, re.MULTILINE))
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_setting_named_exists(page):
    text = text_of(page)
    for command in re.findall(r"stratos-lite ([a-z][a-z-]*)", text):
        assert command in COMMANDS, f"{page.name}: `stratos-lite {command}` is no subcommand"
    unknown = named_settings(text) - SETTINGS - DEMO_SETTINGS - {"key"}  # `--set key=value`: the form itself
    assert not unknown, f"{page.name}: names settings that do not exist: {sorted(unknown)}"


def test_every_setting_is_documented():
    documented = set(re.findall(r"`(\w+)`", "".join(text_of(page) for page in PAGES)))
    assert SETTINGS - documented == set(), "settings no guide names"


def documented_calls(api: str) -> dict[str, list[str] | None]:
    """Each `sl.name(parameters)` entry of docs/api.md: the parameter names it lists (None for `(...)`, a
    dataclass's fields, and for names that are not called)."""
    entries = {}
    for match in re.finditer(r"`sl\.(\w+)", api):
        name, rest = match.group(1), api[match.end():]
        inner = balanced_parentheses(rest) if rest.startswith("(") else None
        if inner is None or inner == "...":
            entries.setdefault(name, None)
            continue
        entries[name] = [p.split("=")[0].strip().lstrip("*") for p in split_top_level(inner)
                         if p.strip() and p.strip() != "*"]
    return entries


def balanced_parentheses(text: str) -> str:
    """What the parenthesis that opens `text` holds, up to the one that closes it."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[1:index]
    raise ValueError(f"unbalanced: {text[:60]!r}")


def split_top_level(inner: str) -> list[str]:
    """Parameters separated by the commas outside any brackets (a default may be a tuple)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(inner):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(inner[start:index])
            start = index + 1
    return [*parts, inner[start:]]


def test_the_api_guide_names_every_public_name_with_its_parameters():
    entries = documented_calls(text_of(ROOT / "docs" / "api.md"))
    assert set(sl.__all__) - entries.keys() == set(), "public names docs/api.md does not describe"
    for name, listed in entries.items():
        if listed is None:
            continue
        real = [p.name for p in inspect.signature(getattr(sl, name)).parameters.values()]
        assert listed == real, f"docs/api.md: sl.{name} lists {listed}, its signature has {real}"


@pytest.fixture
def workspace(demo_dir, tmp_path, monkeypatch):
    """A folder where the examples' paths exist: models/Qwen3-8B (a tiny Qwen3), data/ (the demo's records),
    configs/ (the repository's recipes)."""
    save_base(str(demo_dir), tmp_path / "models" / "Qwen3-8B")
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(demo_dir / name, tmp_path / "data" / name)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_example_runs_as_written(workspace):
    """The example under "The public API", with its folders pointed at a tiny model and the demo data."""
    example = re.search(r"## The public API\n.*?```python\n(.*?)```", text_of(ROOT / "README.md"), re.DOTALL).group(1)
    exec(compile(example, "README.md", "exec"), {})
    assert json.loads((workspace / "runs/v2/eval/metrics.json").read_text())["examples"] == 20
    assert (workspace / "runs/v2/adapter/adapter_model.safetensors").is_file()
    assert (workspace / "runs/v2/merged/config.json").is_file() and (workspace / "runs/v2/Modelfile").is_file()


def guide_examples() -> list[tuple[str, str]]:
    """(where, code) of each Python example in docs/, but those marked as not run on a CPU."""
    examples = []
    for page in GUIDES:
        for number, (before, code) in enumerate(re.findall(r"([^\n]*)\n```python\n(.*?)```", text_of(page),
                                                           re.DOTALL)):
            if not before.startswith(NOT_RUN):
                examples.append((f"{page.name}#{number + 1}", code))
    return examples


@pytest.mark.parametrize(("where", "code"), guide_examples(), ids=[where for where, _ in guide_examples()])
def test_guide_examples_run_as_written(workspace, where, code):
    exec(compile(code, where, "exec"), {})
