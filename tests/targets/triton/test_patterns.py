"""Gated MLPs are found from the captured graph and the groups, on every random architecture:
the weights a pattern names, put through ``down(act(x @ Wg^T) * (x @ Wu^T))``, reproduce the
module it names, for pruned (odd, per-layer) widths too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _pruning_fixtures import ARCHS, fresh, groups_of, random_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.data.models import RANDOM_CONFIGS
from prunegraph.ir.analysis import analyze
from prunegraph.plan.plan import Plan
from prunegraph.plan.slicing import apply_plan
from prunegraph.targets.triton.patterns import find_gated_mlps, gated_mlps
from prunegraph.targets.triton.runner import unsupported

_ACT = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}

#: arch -> (gated MLPs per layer, activation, module suffix); None: no gated MLP.
EXPECTED = {
    "llama": ("silu", "mlp"), "mistral": ("silu", "mlp"), "qwen3": ("silu", "mlp"),
    "gemma3": ("gelu_tanh", "mlp"), "phi3": ("silu", "mlp"),
    "qwen2-moe": ("silu", "mlp.shared_expert"),
    "gpt2": None, "qwen3-moe": None, "olmoe": None, "mixtral": None,
}


def _pruned(arch: str, seed: int):
    model = fresh(arch)
    apply_plan(model, random_plan(arch, seed))
    return model


def _check_numerics(model, found, seed: int) -> None:
    """Each pattern's weights through the gated-MLP formula equal its module's forward."""
    gen = torch.Generator().manual_seed(seed)
    for m in found.mlps:
        mlp = model.get_submodule(m.module)
        wg, wu, wd = m.weight_reader(mlp)()
        x = torch.randn(2, 5, m.hidden, generator=gen)
        with torch.no_grad():
            want = mlp(x)
            got = F.linear(_ACT[m.activation](F.linear(x, wg)) * F.linear(x, wu), wd)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert wg.shape == wu.shape == (m.intermediate, m.hidden) == wd.shape[::-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_mlps_of_every_architecture(arch):
    model = _pruned(arch, seed=3)
    analysis = analyze(model)
    found = find_gated_mlps(analysis.graph, analysis.groups)
    layers = RANDOM_CONFIGS[arch][1]["num_hidden_layers" if arch != "gpt2" else "n_layer"]
    expected = EXPECTED[arch]
    channel_groups = [g for g in analysis.groups if "channels" in g.kind]
    gated = {m.group for m in found.mlps}
    assert set(found.not_gated) == {g.name for g in channel_groups} - gated
    if expected is None:
        assert found.mlps == []
        reason = "one producer" if arch == "gpt2" else "routed experts"
        mlp_reasons = [r for name, r in found.not_gated.items() if ".mlp" in name]
        assert mlp_reasons and all(reason in r for r in mlp_reasons), mlp_reasons
        return
    activation, suffix = expected
    assert [m.module for m in found.mlps] == [
        f"{'model.layers'}.{i}.{suffix}" for i in range(layers)]
    assert {m.activation for m in found.mlps} == {activation}
    assert not any(m.bias for m in found.mlps)
    for m in found.mlps:
        group = next((g for g in channel_groups if g.name == m.group), None)
        if group is not None:  # the group and the graph agree on the roles
            producers = {(p.param, p.offset) for p in group.members if p.role == "producer"}
            assert producers == {(m.gate.param, m.gate.offset), (m.up.param, m.up.offset)}
            assert [c.param for c in group.members if c.role == "consumer"] == [m.down]
    if arch == "phi3":  # one fused weight: the gate is its first half, up its second
        m = found.mlps[0]
        assert m.gate.param == m.up.param and m.gate.param.endswith("gate_up_proj.weight")
        assert (m.gate.offset, m.up.offset) == (0, m.intermediate)
    assert all((unsupported(m) is None) == (activation == "silu") for m in found.mlps)
    _check_numerics(model, found, seed=0)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000), arch=st.sampled_from(["llama", "phi3", "qwen2-moe"]))
@pytest.mark.slow
def test_pattern_weights_reproduce_the_module_for_random_plans(seed, arch):
    model = _pruned(arch, seed)
    found = gated_mlps(model)
    assert len(found.mlps) == 2
    _check_numerics(model, found, seed)


def test_a_width_of_one_is_found_from_the_graph_alone():
    """The analysis makes no channels group of size 1 (a broadcast dim to it); the product in
    the graph is still a gated MLP."""
    groups = groups_of("phi3")
    keep = {g.name: [5] for g in groups if g.kind == "channels" and g.layer == 0}
    model = fresh("phi3")
    apply_plan(model, Plan.from_keep(groups, keep, model=fresh("phi3")))
    found = gated_mlps(model)
    first = next(m for m in found.mlps if m.module == "model.layers.0.mlp")
    assert (first.group, first.intermediate, first.up.offset) == (None, 1, 1)
    _check_numerics(model, found, seed=1)


def test_a_module_that_computes_more_is_named_but_not_swappable():
    model = fresh("llama")
    mlp = model.model.layers[1].mlp
    plain = type(mlp).forward.__get__(mlp)
    mlp.forward = lambda x: plain(x) + x  # a residual inside the module
    found = gated_mlps(model)
    second = found.mlps[1]
    assert second.module is None and "computes more than the gated MLP" in second.module_reason
    assert "no module's forward can be swapped" in unsupported(second)
    assert found.mlps[0].module == "model.layers.0.mlp"


def test_biases_are_reported():
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = RANDOM_CONFIGS["llama"]
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **dict(kwargs, mlp_bias=True))).eval()
    found = gated_mlps(model)
    assert len(found.mlps) == 2 and all(m.bias for m in found.mlps)
    assert "bias" in unsupported(found.mlps[0])
