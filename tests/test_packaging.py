"""Packaging truths: the licence file matches pyproject, requirements.txt installs everything."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image"}


def pins(path: Path) -> dict[str, str]:
    """``name -> spec`` of a requirements file, following ``-r`` includes."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out |= pins(path.parent / line[3:].strip())
        elif line:
            name, spec = re.match(r"([A-Za-z0-9_.\[\],-]+)\s*(.*)", line).groups()
            out[re.sub(r"\[.*\]", "", name).lower()] = spec
    return out


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def third_party(names: set[str]) -> set[str]:
    local = {"captioning", "dashboard", "tests", "__future__"}
    return {DIST_OF.get(n, n).lower() for n in names - local if n not in sys.stdlib_module_names}


def test_licence_file_matches_pyproject():
    assert PYPROJECT["license"] == "MIT" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_requirements_txt_pins_the_library_and_every_extra():
    req = pins(REPO / "requirements.txt")
    wanted = list(PYPROJECT["dependencies"])
    for extra in PYPROJECT["optional-dependencies"].values():
        wanted += extra
    missing = [r for r in wanted if dist_name(r) not in req]
    assert not missing, f"requirements.txt does not install {missing}"
    for r in PYPROJECT["dependencies"]:
        if "==" in r:  # torch and torchvision: the same exact pin in both places
            assert req[dist_name(r)] == r[len(dist_name(r)) :], r


def test_each_part_declares_what_it_imports():
    core = {dist_name(r) for r in PYPROJECT["dependencies"]}
    dashboard = core | {dist_name(r) for r in PYPROJECT["optional-dependencies"]["dashboard"]}
    lib = third_party(imported_top_level(REPO / "captioning"))
    assert {"torch", "safetensors"} <= lib  # the scan sees real imports
    assert not lib & {"streamlit", "plotly", "pandas"}, "the library must not need the dashboard"
    app = third_party(imported_top_level(REPO / "dashboard"))
    assert app <= dashboard, f"dashboard imports {app - dashboard} outside its extra"
