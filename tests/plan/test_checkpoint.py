"""Saving pruned models and rebuilding them from config + plan, with no model code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _pruning_fixtures import fresh, groups_of, input_ids, logits, random_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph import from_pretrained
from prunegraph.errors import CheckpointError
from prunegraph.plan.checkpoint import save_pruned
from prunegraph.plan.plan import Plan
from prunegraph.plan.slicing import apply_plan


def _pruned(arch, plan):
    model = fresh(arch)
    apply_plan(model, plan)
    return model


def _uniform_plan(arch):
    """Same kept units in every layer: a plan that plain HF config fields can describe."""
    keep = {}
    for g in groups_of(arch):
        if not g.prunable:
            continue
        if g.kind == "heads":
            keep[g.name] = list(range(g.constraints.q_per_kv or 1))   # one kv head, all its q
        elif g.kind == "experts":
            keep[g.name] = list(range(g.constraints.min_units + 1))
        elif g.constraints.experts:
            keep[g.name] = [list(range(0, g.size, 2))] * g.constraints.experts
        else:
            keep[g.name] = list(range(0, g.size, 3))
    return Plan.from_keep(groups_of(arch), keep, model=fresh(arch))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), arch=st.sampled_from(["llama", "qwen3-moe", "phi3", "gemma3"]))
def test_round_trip_non_uniform(tmp_path_factory, seed, arch):
    plan = random_plan(arch, seed)
    model = _pruned(arch, plan)
    path = save_pruned(model, plan, tmp_path_factory.mktemp("ckpt") / "m")
    back = from_pretrained(path)
    ids = input_ids(arch, seed)
    # Weights round-trip bit for bit (below); the fused-experts kernel may take another path for
    # freshly loaded (differently aligned) tensors, so logits agree to float32 rounding.
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-6)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not back.training
    out = back.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_uniform_plan_is_a_standard_hf_checkpoint(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    plan = _uniform_plan(arch)
    model = _pruned(arch, plan)
    path = save_pruned(model, plan, tmp_path / "m")
    assert json.loads((path / "prunegraph_plan.json").read_text())["extra"]["hf_compatible"]
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = input_ids(arch)
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_tied_weights_are_stored_once_and_retied(tmp_path):
    plan = random_plan("llama", 4)
    path = save_pruned(_pruned("llama", plan), plan, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    back = from_pretrained(path)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_save_refuses_unsliced_model_and_writes_nothing(tmp_path):
    plan = random_plan("llama", 5)
    with pytest.raises(CheckpointError, match="slice the base model"):
        save_pruned(fresh("llama"), plan, tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_save_refuses_existing_folder(tmp_path):
    plan = random_plan("llama", 5)
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_pruned(_pruned("llama", plan), plan, tmp_path / "m")


def test_corrupt_and_missing_files_are_named(tmp_path):
    plan = random_plan("qwen3-moe", 6)
    path = save_pruned(_pruned("qwen3-moe", plan), plan, tmp_path / "m")
    weights = path / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError,
                       match="model.safetensors is truncated or corrupt.*copy the whole folder again"):
        from_pretrained(path)
    weights.write_bytes(blob)
    plan_json = path / "prunegraph_plan.json"
    text = plan_json.read_text()
    plan_json.write_text(text[:100])
    with pytest.raises(CheckpointError, match="prunegraph_plan.json is corrupt or truncated"):
        from_pretrained(path)
    plan_json.write_text(text)
    (path / "prunegraph_buffers.safetensors").unlink()
    with pytest.raises(CheckpointError, match="prunegraph_buffers.safetensors is missing"):
        from_pretrained(path)


def test_load_model_reads_pruned_folders(tmp_path):
    from prunegraph.data.models import load_model

    plan = random_plan("phi3", 8)
    model = _pruned("phi3", plan)
    path = save_pruned(model, plan, tmp_path / "m")
    back, _ = load_model(str(path))
    ids = input_ids("phi3")
    assert torch.equal(logits(back, ids), logits(model, ids))
