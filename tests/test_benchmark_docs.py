"""Benchmark scripts rewrite only their own section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _docs import NOTES_MARKER, replace_section  # noqa: E402

DOC = "# Benchmarks\n\n## A\n\nold a\n\n### a detail\n\nmore a\n\n## B\n\nb\n"


def test_section_replaced_in_place_and_others_kept(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    replace_section(path, "## A", "## A\n\nnew a\n")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb\n"
    replace_section(path, "## A", "## A\n\nnew a\n")  # idempotent
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb\n"


def test_missing_section_is_appended_and_last_section_replaced(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    replace_section(path, "## C", "## C\n\nc\n")
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")
    replace_section(path, "## C", "## C\n\nc2\n")
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc2\n")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_notes_below_the_marker_survive_a_rewrite(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Benchmarks\n\n## A\n\ntable 1\n\n{NOTES_MARKER}\n\nwhy it is so\n\n## B\n\nb\n")
    replace_section(path, "## A", "## A\n\ntable 2\n")
    assert path.read_text() == (f"# Benchmarks\n\n## A\n\ntable 2\n\n{NOTES_MARKER}\n\n"
                                f"why it is so\n\n## B\n\nb\n")
