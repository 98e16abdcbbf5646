"""Zero-shot multiple-choice tasks in BIG-bench JSON format.

Four BIG-bench tasks ship with the package (Apache-2.0, ``prunegraph/data/ATTRIBUTION.md``):
``winowhy``, ``timedial``, ``goal_inference``, ``cause_and_effect_one_sentence``.
``load_task(name_or_path)`` loads one of them or any BIG-bench JSON file with
``examples[].input`` and ``examples[].target_scores``.

Prompts follow BIG-bench's own zero-shot format (``bigbench/api/json_task.py``)::

    task_prefix + example_input_prefix + input [+ "\\n  choice: " + option, for each option]
        + example_output_prefix

with BIG-bench's defaults where the JSON leaves a field out (input prefix ``"\\nQ: "``, output
prefix ``"\\nA: "``, choices appended). Choices are appended in sorted order (BIG-bench shuffles
them with its own random state). The prompt is right-stripped, because scoring appends
``" " + option`` to it as lm-eval does.

Example::

    task = load_task("winowhy")
    task.examples[0].prompt, task.examples[0].options, task.examples[0].scores
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prunegraph.errors import PrunegraphError, nearest

__all__ = ["BUILTIN_TASKS", "Example", "Task", "load_task", "task_from_json"]

#: Tasks shipped in ``prunegraph/data/bigbench``.
BUILTIN_TASKS = ("cause_and_effect_one_sentence", "goal_inference", "timedial", "winowhy")

_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_CHOICE_PREFIX = "\n  choice: "


@dataclass(frozen=True)
class Example:
    """One question: its formatted prompt, its options and each option's target score."""

    prompt: str
    options: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class Task:
    """A named list of multiple-choice examples."""

    name: str
    examples: tuple[Example, ...]


def load_task(name_or_path: str) -> Task:
    """A built-in task by name (see :data:`BUILTIN_TASKS`) or a BIG-bench JSON file by path.

    Raises:
        PrunegraphError: unknown name, missing file, or a file that is not a valid
            multiple-choice BIG-bench task.
    """
    if name_or_path in BUILTIN_TASKS:
        raw = resources.files("prunegraph.data.bigbench").joinpath(
            f"{name_or_path}.json.xz").read_bytes()
        return task_from_json(json.loads(lzma.decompress(raw)), name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        hint = nearest(name_or_path, BUILTIN_TASKS)
        raise PrunegraphError(f"unknown task '{name_or_path}': not a built-in task "
                              f"({', '.join(BUILTIN_TASKS)}) and not an existing JSON file.{hint}")
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PrunegraphError(f"task file {path} is not valid JSON ({e}); give a BIG-bench "
                              f"task.json") from e
    return task_from_json(data, path.name.split(".")[0])


def task_from_json(data: Any, name: str) -> Task:
    """Build a :class:`Task` from parsed BIG-bench JSON; validates every example first."""
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise PrunegraphError(f"task '{name}' has no 'examples' list; a BIG-bench task is a JSON "
                              f"object with examples[].input and examples[].target_scores")
    bad = [i for i, ex in enumerate(data["examples"])
           if not (isinstance(ex, dict) and isinstance(ex.get("input"), str)
                   and isinstance(ex.get("target_scores"), dict) and len(ex["target_scores"]) >= 2
                   and max(ex["target_scores"].values()) > 0)]
    if bad or not data["examples"]:
        raise PrunegraphError(
            f"task '{name}': examples {bad[:10]}{'...' if len(bad) > 10 else ''} lack a string "
            f"'input' or a 'target_scores' dict with >= 2 options and one positive score; only "
            f"multiple-choice tasks can be scored" if bad else f"task '{name}' has no examples")
    task_prefix = data.get("task_prefix", "")
    in_prefix = data.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    out_prefix = data.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    append = data.get("append_choices_to_input", True)
    examples = []
    for ex in data["examples"]:
        options = tuple(ex["target_scores"])
        text = ex["input"]
        if append:
            text += "".join(_CHOICE_PREFIX + o for o in sorted(options))
        prompt = (task_prefix + in_prefix + text + out_prefix).rstrip()
        examples.append(Example(prompt, tuple(o.strip() for o in options),
                                tuple(float(ex["target_scores"][o]) for o in options)))
    return Task(name, tuple(examples))
