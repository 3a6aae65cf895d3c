"""The distribution installs one namespace, `soraflow`, and every source folder is in it."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = ("configs", "flows", "models", "storage", "tasks")


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"soraflow." + ".".join(p.parent.relative_to(REPO).parts)
             for top in TOP for p in (REPO / top).rglob("__init__.py")}
    assert found == listed


def test_namespace_imports_from_outside_the_repository(tmp_path):
    code = "import soraflow.models, soraflow.tasks, soraflow.flows, soraflow.storage, soraflow.configs\n" \
           "import importlib.util as u\n" \
           "print(all(u.find_spec(n) is None for n in ('models', 'tasks', 'flows', 'storage', 'configs')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_no_line_over_120_characters_and_no_module_over_400_lines():
    """The code stays readable side by side: short lines everywhere, modules of one concept in the package."""
    long_lines, long_modules = [], []
    for top in (*TOP, "bench", "tests"):
        for path in (REPO / top).rglob("*.py"):
            lines = path.read_text().splitlines()
            long_lines += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(lines, 1) if len(line) > 120]
            if top in TOP and len(lines) > 400:
                long_modules.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert long_lines == [] and long_modules == []
