"""Writing a benchmark's results into ``docs/benchmarks.md``: one section per benchmark."""

from __future__ import annotations

from pathlib import Path

from prunegraph.runfolder import atomic_write_text


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` in place of the one starting with ``heading`` (up to the next ``## ``
    heading), or append it; other sections stay as they are. Written atomically, so an
    interrupted run leaves the old file."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text.rstrip("\n") + "\n")
