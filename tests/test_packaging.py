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
