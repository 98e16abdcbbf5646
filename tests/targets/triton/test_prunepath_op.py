"""PrunePath FFNs as one custom operator (``as_op``), for ``torch.compile`` of a whole decode step:
the same outputs as the direct kernel call, a whole routed model traced by dynamo as one graph
(no graph break at the FFNs), and a contiguous expert layout (no clustering) that routes like a
MoEfied one."""

from __future__ import annotations

import pytest
import torch
from _pruning_fixtures import fresh, groups_of

from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import contiguous_layout, moefy
from prunegraph.targets.triton.runner import install_prunepath_mlps, own_forwards, uninstall


def _routed(layout_of, tau: float = 0.6):
    model = fresh("llama")
    layout = layout_of(model)
    pp.install(model, layout, tau=tau)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in pp.routers(model):
            r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * 0.5)
    return model, layout


def _contiguous(model):
    return contiguous_layout(list(groups_of("llama")), 12)


def test_contiguous_layout_is_moefy_without_moving_channels():
    model = fresh("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = _contiguous(model)
    clustered = moefy(fresh("llama"), list(groups_of("llama")), 12, iters=2)
    keys = ("group", "producer", "consumer", "router", "width", "group_size", "weights")
    assert [{k: e[k] for k in keys} for e in layout] == [{k: e[k] for k in keys}
                                                          for e in clustered]
    assert all(e["permutation"] == list(range(e["width"])) for e in layout)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("tokens", [1, 3, 20])  # decode, a small batch, the grouped prefill
def test_operator_equals_the_direct_kernels_and_the_masked_path(tokens):
    model, _ = _routed(_contiguous)
    ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        install_prunepath_mlps(model)
        direct = model(input_ids=ids).logits
        uninstall(model)
        install_prunepath_mlps(model, as_op=True)
        through_op = model(input_ids=ids).logits
        with own_forwards(model):  # the masked path again, kernels kept installed
            assert torch.equal(model(input_ids=ids).logits, masked)
    assert torch.equal(through_op, direct)
    torch.testing.assert_close(through_op, masked, rtol=1e-4, atol=1e-4)


def test_a_routed_model_compiles_as_one_graph():
    """``fullgraph=True`` fails at any graph break: the FFNs are single operator nodes."""
    model, _ = _routed(_contiguous)
    install_prunepath_mlps(model, as_op=True)
    ids = torch.randint(3, 200, (2, 1), generator=torch.Generator().manual_seed(1))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False).logits
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and "prunepath_ffn" in str(n.target)]
    assert len(calls) == len(pp.routers(model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_released_ffn_handle_errors_clearly():
    from prunegraph.targets.triton.prunepath_op import prunepath_ffn_op

    with pytest.raises(RuntimeError, match="handle 10000000 is gone"):
        prunepath_ffn_op(torch.zeros(1, 4), 10_000_000, 0.5, False)
