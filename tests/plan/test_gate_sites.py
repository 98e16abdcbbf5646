"""Gates on activations: the same function and gradients as gates on parameters, on every
architecture, with no weight-sized gradient in the backward; bypass and folding."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import ARCHS, fresh, groups_of, input_ids, logits
from torch.utils._python_dispatch import TorchDispatchMode

from prunegraph.plan.gating import ScaleChannels, apply_gates, gate_shape, has_gates


def _values(arch: str, seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Random positive gate values (some exactly 0 outside experts groups) for every group."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups_of(arch):
        if not g.prunable or not g.gate_site:
            continue
        v = 0.5 + torch.rand(gate_shape(g), generator=gen)
        if g.constraints.removal == "zero":
            v = v * (torch.rand(gate_shape(g), generator=gen) > 0.2)
        out[g.name] = v.requires_grad_(requires_grad)
    return out


def _gated_loss(arch: str, sites: str, ids: torch.Tensor):
    model = fresh(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    values = _values(arch, requires_grad=True)
    gates = apply_gates(model, list(groups_of(arch)), values, sites=sites)
    out = model(input_ids=ids).logits
    out.square().mean().backward()
    return gates, out.detach(), {n: v.grad for n, v in values.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_sites_compute_the_parameter_sites_function_and_gradients(arch):
    ids = input_ids(arch)
    act, out_act, grad_act = _gated_loss(arch, "auto", ids)
    par, out_par, grad_par = _gated_loss(arch, "parameter", ids)
    assert par.sites["activation"] == 0
    assert act.sites["activation"] + act.sites["parameter"] == par.sites["parameter"]
    if not any(g.kind in ("experts", "expert_channels") for g in groups_of(arch)):
        assert act.sites == {"activation": par.sites["parameter"], "parameter": 0}
    torch.testing.assert_close(out_act, out_par, atol=2e-5, rtol=1e-4)
    for name, g in grad_par.items():
        torch.testing.assert_close(grad_act[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_expert_tensors_keep_the_parameter_site():
    model = fresh("qwen3-moe")
    gates = apply_gates(model, list(groups_of("qwen3-moe")))
    assert gates.sites["activation"] > 0 and gates.sites["parameter"] > 0
    dense = fresh("llama")
    assert apply_gates(dense, list(groups_of("llama"))).sites["parameter"] == 0


class _WeightGrads(TorchDispatchMode):
    """Counts matrix products whose result has the shape of a 2-D weight of the model."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) \
                and tuple(out.shape[-2:]) in self.shapes:
            self.hits += 1
        return out


@pytest.mark.parametrize("sites, weight_grads", [("auto", False), ("parameter", True)])
def test_activation_gates_cost_no_weight_gradient(sites, weight_grads):
    model = fresh("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    values = _values("llama", requires_grad=True)
    apply_gates(model, list(groups_of("llama")), values, sites=sites)
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2
              and p.shape[0] != model.config.vocab_size}
    loss = model(input_ids=input_ids("llama", length=5)).logits.square().mean()
    mode = _WeightGrads(shapes)
    with mode:
        loss.backward()
    assert (mode.hits > 0) == weight_grads
    assert all(v.grad is not None for v in values.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "gpt2"])
def test_bypassed_gates_are_the_dense_model(arch):
    ids = input_ids(arch)
    want = logits(fresh(arch), ids)
    model = fresh(arch)
    gates = apply_gates(model, list(groups_of(arch)),
                        {n: torch.zeros_like(v) if "experts" not in n else v
                         for n, v in _values(arch).items()})
    with gates.bypassed():
        assert torch.equal(logits(model, ids), want)
    assert not torch.equal(logits(model, ids), want)


@pytest.mark.parametrize("arch", ["llama", "qwen2-moe", "gpt2", "phi3"])
def test_fold_multiplies_the_gates_into_the_weights(arch):
    ids = input_ids(arch)
    model = fresh(arch)
    values = {n: v.clamp(min=0.5) for n, v in _values(arch, seed=3).items()}
    gates = apply_gates(model, list(groups_of(arch)), values)
    want = logits(model, ids)
    sites = sum(gates.sites.values())
    assert gates.fold() == sites > 0
    assert not has_gates(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(logits(model, ids), want, atol=2e-5, rtol=1e-4)


def test_scale_channels_gradients():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ScaleChannels.apply, (x, m))
