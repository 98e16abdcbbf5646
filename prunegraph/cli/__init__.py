"""The ``prunegraph`` command line: the core's commands (``inspect``, ``run``, ``passes``) and
those plugins register (``eval``, ``export``)."""

from prunegraph.cli.main import command, main

__all__ = ["command", "main"]
