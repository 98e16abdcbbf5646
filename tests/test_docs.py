"""Every code block of README.md and docs/*.md runs, so the docs cannot drift from the code.

Each fenced block says what it is:

* ``python``: executed, in a fresh namespace, in one temporary folder per document (so a block may
  use what an earlier block of the same document wrote), on ``random:llama`` instead of the real
  model and with small measurements (:data:`SUBSTITUTIONS`; each one must still match the docs);
* ``yaml``: a pipeline spec, validated with ``load_spec``; the document's latest spec is saved as
  ``pipe.yaml`` for the commands after it;
* ``sh``: commands, run in-process through ``prunegraph``'s ``main`` (``prunegraph run`` on
  ``random:llama`` with small measurements appended as ``--set``), the set-up commands
  (``python3 -m venv``, ``pip install``) checked against ``pyproject.toml``;
* ``text``: output shown to the reader, not run.

Untagged blocks are allowed only in ``docs/benchmarks.md``, whose sections the benchmark scripts
write: their commands take hours on a GPU, so they are checked instead of run (the scripts and
their options exist; ``prunegraph run`` specs and overrides validate).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "yaml", "sh", "text"}

#: Text replaced in python blocks and commands: the real model by a tiny random one, real
#: measurement sizes by small ones.
SUBSTITUTIONS = {
    "python": [('"smollm2-135m"', '"random:llama"'), ("ppl_blocks=16", "ppl_blocks=2"),
               ("limit=200", "limit=4")],
}
MODEL_SUBSTITUTIONS = {"smollm2-135m": "random:llama", "meta:qwen3-30b-a3b": "random:qwen3-moe"}

#: Parameters that make a pass cheap on random:llama, appended as --set to `prunegraph run`.
SHRINK = {"Evaluate": {"ppl_blocks": 2, "limit": 4}, "Prune": {"calib_blocks": 2},
          "Train": {"steps": 2, "polish_steps": 0, "warmup": 0},
          "PrunePath": {"warmup_steps": 1, "steps": 1},
          "Distill": {"train.steps": 2, "train.batch_size": 2}, "TauSweep": {"ppl_blocks": 1}}

_FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every fenced block of a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def test_every_block_says_what_it_is():
    bad = [f"{p.relative_to(ROOT)}:{line}: ```{lang}" for p in DOCS
           for line, lang, _ in blocks(p)
           if lang not in LANGUAGES and not (p.name == "benchmarks.md" and lang == "")]
    assert not bad, f"code blocks need one of {sorted(LANGUAGES)}: {bad}"


# ------------------------------------------------------------------------------- commands


def _commands(text: str) -> list[list[str]]:
    """Shell commands of a block: lines joined at backslashes, split at && and comments."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip()
        if line.startswith("$ "):
            line = line[2:]
        for part in line.split("&&"):
            if part.strip() and not part.strip().startswith("#"):
                out.append(shlex.split(part))
    return out


def _shrunk(spec_path: Path, argv: list[str]) -> list[str]:
    """``--set`` overrides that make the spec's passes cheap, by their index in the file."""
    data = yaml.safe_load(spec_path.read_text())
    extra = [] if any(a.startswith("model=") for a in argv) else ["--set", "model=random:llama"]
    for i, entry in enumerate(data.get("passes", [])):
        name = entry if isinstance(entry, str) else next(iter(entry))
        for key, value in SHRINK.get(name, {}).items():
            extra += ["--set", f"passes.{i}.{key}={value}"]
    return extra


def _check_setup(argv: list[str]) -> None:
    """venv / activate / pip install / pytest: what they name exists."""
    if argv[:2] == ["python3", "-m"] and argv[2] == "venv" or argv[0] == ".":
        return
    if argv[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
        return
    assert argv[:2] == ["pip", "install"], f"unexpected command {argv}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for arg in argv[2:]:
        m = re.match(r'^-?e?\s*"?\.\[([\w,]+)\]"?$', arg) or re.match(r"^\.\[([\w,]+)\]$", arg)
        if m:
            for extra in m.group(1).split(","):
                assert re.search(rf"^{extra} = ", pyproject, re.M), f"no extra {extra!r}"


def _check_benchmark(argv: list[str]) -> None:
    """A benchmark script exists and defines every option the command passes."""
    script = ROOT / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    source = script.read_text()
    for arg in argv[2:]:
        if arg.startswith("--"):
            flag = arg.split("=")[0]
            assert f'"{flag}"' in source, f"{argv[1]} has no option {flag}"


def _run_cli(argv: list[str], cwd: Path, check_only: bool) -> None:
    from prunegraph.cli.main import main

    argv = [MODEL_SUBSTITUTIONS.get(a, a) for a in argv]
    if argv[0] == "run":
        spec = Path(argv[1]) if (cwd / argv[1]).exists() else ROOT / argv[1]
        argv = ["run", str(spec), *argv[2:]]
        if check_only:
            from prunegraph.pipeline.spec import load_spec

            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            load_spec(spec, overrides=sets)
            return
        argv += _shrunk(spec, argv)
    elif check_only:
        from prunegraph.cli.main import build_parser

        build_parser().parse_args(argv)
        return
    assert main(argv) == 0, f"prunegraph {shlex.join(argv)} failed"


def run_block(lang: str, text: str, cwd: Path, check_only: bool = False) -> None:
    if lang == "yaml":
        from prunegraph.pipeline.spec import load_spec

        data = yaml.safe_load(text)
        if isinstance(data, dict) and "passes" in data:
            load_spec(data)
            (cwd / "pipe.yaml").write_text(text)
    elif lang == "python":
        for old, new in SUBSTITUTIONS["python"]:
            text = text.replace(old, new)
        exec(compile(text, "<docs>", "exec"), {"__name__": "__docs__"})
    elif lang in ("sh", ""):
        for argv in _commands(text):
            if argv[0] == "prunegraph":
                _run_cli(argv[1:], cwd, check_only)
            elif argv[0] in ("python", "python3") and argv[1].startswith("benchmarks/"):
                _check_benchmark(argv)
            else:
                _check_setup(argv)


@pytest.fixture
def registries_restored():
    """A block that declares a pass, a state key or a target (the docs' worked examples) leaves
    no trace in the registries the other tests read."""
    from prunegraph.pipeline import contract, targets
    from prunegraph.pipeline.plugins import load_plugins

    load_plugins()  # what the plugins register belongs to the snapshot
    registries = (targets._TARGETS, contract._REGISTRY, contract._KEYS)
    saved = [dict(r) for r in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
@pytest.mark.slow
def test_code_blocks_run(doc, tmp_path, monkeypatch, registries_restored):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if doc.name == "README.md":  # a substitution that no longer matches is drift
        for old, _ in SUBSTITUTIONS["python"]:
            assert old in doc.read_text(), f"README.md no longer contains {old!r}"
    for line, lang, text in blocks(doc):
        if lang == "text":
            continue
        try:
            run_block(lang, text, tmp_path, check_only=doc.name == "benchmarks.md")
        except BaseException as e:
            raise AssertionError(f"{doc.relative_to(ROOT)}:{line}: the ```{lang} block fails: "
                                 f"{type(e).__name__}: {e}") from e
