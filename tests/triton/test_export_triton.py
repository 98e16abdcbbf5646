"""`prunegraph export triton`: standalone kernels for a pruned model's per-layer MLP widths."""

from __future__ import annotations

import json

import pytest
import torch
from _pruning_fixtures import fresh, random_plan

from prunegraph.cli.main import main
from prunegraph.errors import PreconditionError
from prunegraph.plan.checkpoint import save_pruned
from prunegraph.plan.slicing import apply_plan
from prunegraph.targets.triton.codegen import load_module
from prunegraph.targets.triton.export import export_triton, swiglu_mlp_paths
from prunegraph.targets.triton.runner import install_triton_mlps, uninstall


def test_export_cli_writes_kernels_that_reproduce_the_pruned_model(tmp_path, capsys):
    plan = random_plan("llama", 3)
    model = fresh("llama")
    apply_plan(model, plan)
    folder = save_pruned(model, plan, tmp_path / "m")
    assert main(["export", "triton", str(folder), str(tmp_path / "k")]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = json.loads((tmp_path / "k" / "layers.json").read_text())["layers"]
    widths = {p: model.get_submodule(p).up_proj.out_features for p in layers}
    assert report["layers"] == len(layers) == model.config.num_hidden_layers
    assert all(layers[p]["intermediate"] == w for p, w in widths.items())
    module = load_module(tmp_path / "k" / "kernels.py")
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        install_triton_mlps(model, list(layers), module)
        got = model(input_ids=ids).logits
        uninstall(model)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


def test_a_model_without_swiglu_mlps_is_refused_before_writing(tmp_path):
    paths, _ = swiglu_mlp_paths(fresh("gpt2"))  # GELU MLP with c_fc / c_proj
    assert paths == []
    with pytest.raises(PreconditionError, match="SwiGLU"):
        export_triton(fresh("gpt2"), tmp_path / "k")
    assert not (tmp_path / "k").exists()
