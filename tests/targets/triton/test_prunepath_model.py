"""A MoEfied, routed model's MLPs run on the Triton PrunePath kernels (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import fresh, groups_of

from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath
from prunegraph.pipeline.contract import State
from prunegraph.targets.triton.prunepath import prunepath_ffn


@pytest.mark.parametrize("arch,mode,tau", [("llama", "exclusive", 0.6), ("phi3", "inclusive", 0.4)])
def test_kernels_equal_the_routed_mlp(arch, mode, tau):
    model = fresh(arch)
    state = MoEfy(group_size=12, iters=5)(State(model=model, groups=list(groups_of(arch)))).state
    PrunePath(warmup_steps=0, train=dict(steps=0), tau=tau, mode=mode)(state)
    with torch.no_grad():
        for r in pp.routers(model):
            r.weight.copy_(torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(0)))
    layers = pp.kernel_weights(model)
    assert len(layers) == model.config.num_hidden_layers
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for w in layers:
        mlp = model.get_submodule(w["mlp"])
        with torch.no_grad():
            want = mlp(x)
            got = prunepath_ffn(x, w["wr"], w["wg"], w["wu"], w["wd"], w["tau"], w["group_size"],
                                w["mode"])
        assert torch.allclose(got, want, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_gpt2_mlp_is_refused_clearly():
    model = fresh("gpt2")
    state = MoEfy(group_size=32, iters=3)(State(model=model, groups=list(groups_of("gpt2")))).state
    PrunePath(warmup_steps=0, train=dict(steps=0))(state)
    with pytest.raises(Exception, match="SwiGLU"):
        pp.kernel_weights(model)
