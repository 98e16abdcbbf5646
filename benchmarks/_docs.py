"""Writing a benchmark's results into ``docs/benchmarks.md``: one section per benchmark."""

from __future__ import annotations

from pathlib import Path

from prunegraph.pipeline.runfolder import atomic_write_text

#: Written people's reading of a section goes below this line; a re-run keeps it.
NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this section -->"


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` in place of the one starting with ``heading`` (up to the next ``## ``
    heading), or append it; other sections stay as they are. Whatever the old section holds
    from :data:`NOTES_MARKER` on is kept after the new text. Written atomically, so an
    interrupted run leaves the old file."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        old = text[start:end] if end >= 0 else text[start:]
        notes = old.find(NOTES_MARKER)
        kept = "\n" + old[notes:].rstrip("\n") + "\n" if notes >= 0 else ""
        text = (text[:start] + section.rstrip("\n") + "\n" + kept
                + (text[end:] if end >= 0 else ""))
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text.rstrip("\n") + "\n")
