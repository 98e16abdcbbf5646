"""The wheel lists every package folder: a non-editable ``pip install .`` must not lose modules
that an editable install finds on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / folder for name, folder in tool["package-dir"].items()}
    on_disk = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            on_disk.add(".".join((name, *rel)))
    missing = on_disk - set(tool["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_python_m_runs_the_same_command_line(tmp_path):
    """``python -m prunegraph`` and ``python -m prunegraph.cli`` see every registered command
    (run as ``__main__``, the cli module must not use a registry of its own)."""
    import subprocess
    import sys

    for module in ("prunegraph", "prunegraph.cli"):
        out = subprocess.run([sys.executable, "-m", module, "passes", "Train"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "polish_steps" in out.stdout
