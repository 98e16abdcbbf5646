"""Where the repository is, for tests that read its shipped files (examples, benchmark results)."""

from pathlib import Path

#: The repository root (this file is tests/_paths.py).
ROOT = Path(__file__).resolve().parent.parent
