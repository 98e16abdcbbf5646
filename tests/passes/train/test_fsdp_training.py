"""Training on two processes (gloo, CPU) with FSDP2: the same result as one process with twice
the batch, exact resume after one rank is killed, the model given back unsharded, and the
``prunegraph run --nproc 2`` command line writing one run folder.

Tolerance: two ranks average two half-batch gradients where one process takes one mean over the
whole batch, so the results differ by float32 rounding only: gates and weights within 1e-5
after six steps (measured: 1.2e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from _gate_fixtures import write_corpus

sys.path.insert(0, str(Path(__file__).parent))
from _train_worker import gate_run, polish_run, prunepath_run  # noqa: E402

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.slow]  # every test starts two processes

WORKER = Path(__file__).parent / "_train_worker.py"
ATOL = 1e-5


def _torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two launches: (1) an uninterrupted DDP run, then a DDP run whose rank 1 dies in step 5
    (after the step-4 checkpoint); (2) that run resumed, plus hard-concrete, PrunePath, DDP
    with activation checkpointing and DDP polished under round_to: latency."""
    out = tmp_path_factory.mktemp("fsdp")
    corpus = write_corpus(out / "corpus.txt")
    common = [str(WORKER), "--out", str(out), "--corpus", corpus]
    died = _torchrun(*common, "--job", "full:ddp", "--job", "killed:ddp:5", check=False)
    assert died.returncode != 0 and (out / "full.pt").exists() and not (out / "killed.pt").exists()
    assert (out / "killed" / "train" / "checkpoint.dcp" / "meta.pt").exists()
    _torchrun(*common, "--job", "killed:ddp", "--job", "hc:hard_concrete",
              "--job", "pp:prunepath", "--job", "ckpt:ddp+checkpointing",
              "--job", "polish:ddp+polish")
    return out


def _load(runs: Path, name: str) -> dict:
    return torch.load(runs / f"{name}.pt", weights_only=False)


@pytest.mark.parametrize("family, name", [("ddp", "full"), ("hard_concrete", "hc")])
def test_two_ranks_train_the_gates_of_one_process_with_twice_the_batch(runs, family, name):
    two = _load(runs, name)
    one = gate_run(family, None, str(runs / "corpus.txt"), batch_size=2)
    for group, value in one.trained_gates.items():
        torch.testing.assert_close(two["gates"][group], value, atol=ATOL, rtol=0)
    for key, dual in zip(("l1", "l2", "l3"), two["duals"]):
        torch.testing.assert_close(dual, getattr(one.gate_family, key).detach(), atol=ATOL,
                                   rtol=0)
    # the frozen weights came back whole and untouched, as plain parameters
    assert two["plain"]
    for n, p in one.model.named_parameters():
        assert torch.equal(two["weights"][n], p.detach()), n


def test_prunepath_weights_sharded_train_as_in_one_process(runs):
    two = _load(runs, "pp")
    one = prunepath_run(None, str(runs / "corpus.txt"), batch_size=2)
    assert two["plain"]
    moved = 0
    for n, p in one.model.named_parameters():
        torch.testing.assert_close(two["params"][n], p.detach(), atol=ATOL, rtol=0, msg=n)
        moved += n.endswith("router.weight") and bool(p.detach().abs().sum() > 0)
    assert moved > 0  # the routers (zero-initialised) trained


def test_a_killed_run_resumes_to_the_uninterrupted_result(runs):
    full, resumed = _load(runs, "full"), _load(runs, "killed")
    for group, value in full["gates"].items():
        assert torch.equal(resumed["gates"][group], value), group
    for a, b in zip(full["duals"], resumed["duals"]):
        assert torch.equal(a, b)
    assert resumed["metrics"] == full["metrics"]
    assert len(full["metrics"].splitlines()) == 6


def test_activation_checkpointing_under_fsdp_trains_the_same_gates(runs):
    full, ckpt = _load(runs, "full"), _load(runs, "ckpt")
    assert ckpt["plain"]
    for group, value in full["gates"].items():
        assert torch.equal(ckpt["gates"][group], value), group


def test_two_ranks_polish_under_rank_0s_latency_widths(runs, tmp_path, monkeypatch):
    """Each rank timed its own (fake) GPU differently: 32- and 48-channel tiles allow different
    widths, so without one set of widths the ranks would polish under different plans."""
    two = _load(runs, "polish")
    monkeypatch.setenv("PRUNEGRAPH_CACHE", str(tmp_path / "cache"))
    one = polish_run(None, str(runs / "corpus.txt"), batch_size=2, step=32)  # rank 0's timer
    for group, value in one.trained_gates.items():
        assert torch.equal(two["gates"][group] != 0, value != 0), group
        torch.testing.assert_close(two["gates"][group], value, atol=ATOL, rtol=0)
    monkeypatch.setenv("PRUNEGRAPH_CACHE", str(tmp_path / "cache-other"))
    other = polish_run(None, str(runs / "corpus.txt"), batch_size=2, step=48)  # rank 1's
    assert any(not torch.equal(other.trained_gates[g] != 0, v != 0)
               for g, v in one.trained_gates.items())


def test_run_command_with_nproc_writes_one_run_folder(tmp_path):
    from _pruning_fixtures import fresh
    from _tiny_tokenizer import make_tokenizer

    model_dir = tmp_path / "tiny"
    fresh("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "corpus.txt")
    spec = {"model": str(model_dir),
            "passes": ["Analyze", {"Gate": {"family": "ddp", "sparsity": 0.3}},
                       {"Train": {"steps": 3, "batch_size": 1, "block_len": 32, "warmup": 1,
                                  "source": corpus, "plots": False}},
                       "Finalize", "Slice", {"Save": {}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "prunegraph", "run", str(tmp_path / "spec.yaml"),
                           "--out", str(out), "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done; results in") == 1          # rank 0 alone prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["name"] for p in metrics["passes"]] == ["Load", "Analyze", "Gate", "Train",
                                                      "Finalize", "Slice", "Save"]
    assert metrics["train"]["steps"] == 3
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    import prunegraph

    pruned = prunegraph.from_pretrained(out / "model")
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in fresh("llama").parameters())
