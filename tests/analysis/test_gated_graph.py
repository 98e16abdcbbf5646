"""The gated FX graph (compiler view) computes what the gated module (runtime view) computes."""

from __future__ import annotations

import pytest
import torch

from prunegraph.data.models import load_model
from prunegraph.ir.analysis import analyze
from prunegraph.ir.gated_graph import gated_graph
from prunegraph.plan.gating import apply_gates, gate_shape


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "gpt2"])
def test_gated_graph_equals_gated_module(arch):
    model, _ = load_model(f"random:{arch}")
    analysis = analyze(model)
    groups = analysis.prunable()
    gen = torch.Generator().manual_seed(0)
    # positive values: an expert gate of exactly 0 also masks its router logit in the module view
    values = {g.name: torch.rand(gate_shape(g), generator=gen) + 0.1 for g in groups}
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    gm = gated_graph(analysis.graph, groups)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        assert torch.equal(gm(input_ids=ids, use_cache=False).logits, dense)  # gates at 1
        for name, v in values.items():
            gm.gates[name].copy_(v)
        from_graph = gm(input_ids=ids, use_cache=False).logits
        gates = apply_gates(model, groups, values)
        from_module = model(input_ids=ids).logits
        gates.remove()
    torch.testing.assert_close(from_graph, from_module, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(from_graph, dense)
    printed = str(gm.graph)
    for g in groups:
        assert f"gate__{g.name.replace('.', '_').replace(':', '_')}" in printed
