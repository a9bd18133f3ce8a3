"""Packaging consistency: pyproject.toml, environment.yml and the Makefile stay in step."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name
PIP_ONLY = {"nbval", "hypothesis", "pytest", "ruff"}  # listed in the pip: section


def _name(requirement: str) -> str:
    """Distribution name of a requirement string, normalized (``Foo_bar>=1`` -> ``foo-bar``)."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_dependencies() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    names = {_name(r) for r in project.get("dependencies", [])}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra == "benchmarks":  # peers for benchmarks/peers.py, installed --no-deps by
            continue  # `make benchmarks`; not part of the development environment
        names |= {_name(r) for r in reqs}
    return names - {"curvlab"}  # self-references between extras


def environment_yml() -> tuple[set[str], set[str]]:
    """(conda dependencies, pip dependencies) from a tiny YAML-subset parse of environment.yml."""
    conda: set[str] = set()
    pip: set[str] = set()
    section = None
    in_pip = False
    pip_indent = None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = line.split(":", 1)[0].strip()
            in_pip = False
            continue
        if section != "dependencies":
            continue
        item = line.strip()
        if not item.startswith("- "):
            continue
        item = item[2:].strip()
        if in_pip and pip_indent is not None and indent <= pip_indent:
            in_pip = False
        if item == "pip:":
            in_pip, pip_indent = True, indent
            continue
        if in_pip:
            if not item.startswith("-e") and not item.startswith("."):
                pip.add(_name(item))
        else:
            name = re.split(r"[<>=! ]", item, maxsplit=1)[0].lower()
            conda.add(name)
    return conda, pip


def test_environment_yml_parser_sees_both_sections():
    conda, pip = environment_yml()
    assert "python" in conda and "pip" in conda
    assert pip, "environment.yml has no pip: section"


def test_pyproject_and_environment_yml_list_the_same_dependencies():
    conda, pip = environment_yml()
    expected_conda = {CONDA_NAMES.get(n, n) for n in pyproject_dependencies() - PIP_ONLY}
    expected_pip = pyproject_dependencies() & PIP_ONLY
    conda_deps = conda - {"python", "pip"}
    assert expected_conda == conda_deps, (
        f"only in pyproject: {sorted(expected_conda - conda_deps)}; "
        f"only in environment.yml: {sorted(conda_deps - expected_conda)}"
    )
    assert expected_pip == pip, (
        f"pip section: only in pyproject {sorted(expected_pip - pip)}, "
        f"only in environment.yml {sorted(pip - expected_pip)}"
    )


def test_no_torchvision_or_functorch():
    for path in ("pyproject.toml", "environment.yml"):
        text = (ROOT / path).read_text().lower()
        for banned in ("torchvision", "functorch"):
            assert banned not in text, f"{path} mentions {banned}"


def test_makefile_pins_torch_with_overridable_variable():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH\s*\?=\s*torch==2\.13\.0\s*$", text, re.M), (
        "Makefile must set `TORCH ?= torch==2.13.0` (overridable pin)"
    )
    assert re.search(r"pip install[^\n]*\$\(TORCH\)", text), "Makefile must install $(TORCH)"
