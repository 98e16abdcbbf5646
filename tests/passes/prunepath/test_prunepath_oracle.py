"""The router's oracle (passes/prunepath/oracle.py): per-expert output norms equal the explicit
per-expert outputs, the statistics count what they say, the ``fit`` initialisation is the
closed-form regression, distillation moves the router toward the oracle, and the probes land in
the pass metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.errors import SpecError
from prunegraph.passes.prunepath import oracle
from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath
from prunegraph.pipeline.contract import State


def _explicit_norms(h: torch.Tensor, wd: torch.Tensor, g: int) -> torch.Tensor:
    cols = range(0, h.shape[-1], g)
    return torch.stack([(h[..., c:c + g].double() @ wd[:, c:c + g].double().T).norm(dim=-1)
                        for c in cols], dim=-1)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 6), hidden=st.integers(1, 9), g=st.integers(1, 7),
       experts=st.integers(1, 6), last=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_expert_output_norms_equal_each_experts_output(t, hidden, g, experts, last, seed):
    width = g * (experts - 1) + min(last, g)  # a smaller last expert too
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, t, width, generator=gen)
    wd = torch.randn(hidden, width, generator=gen)
    got = oracle.expert_output_norms(h, wd, g)
    assert got.shape == (2, t, -(-width // g))
    torch.testing.assert_close(got.double(), _explicit_norms(h, wd, g), rtol=1e-4, atol=1e-4)


def test_statistics_count_top1_and_coverage():
    """One router by hand: top-1 agreement and the coverage of the selected experts against
    the oracle's same number of experts, computed by brute force."""
    gen = torch.Generator().manual_seed(3)
    hidden, width, g = 6, 20, 4                        # five experts of four channels
    router = pp.Router(hidden, width, g, tau=0.6)
    router.weight.data = torch.randn(5, hidden, generator=gen) * 2
    router.down_role = ("weight", 1, 0)
    down = torch.nn.Linear(width, hidden, bias=False)
    x, h = torch.randn(7, hidden, generator=gen), torch.randn(7, width, generator=gen)
    router.observing = True
    router.route(x)
    keep = router._keep.clone()
    router.scale(h, down)
    norms = _explicit_norms(h, down.weight.detach(), g)
    logits = x @ router.weight.detach().T
    top1 = (logits.argmax(-1) == norms.argmax(-1)).float().mean()
    k = keep.sum(-1)
    best = torch.stack([norms[i].sort(descending=True).values[:k[i]].sum() for i in range(7)])
    coverage = ((norms * keep).sum(-1) / best).mean()
    stats = oracle.oracle_stats([router])
    assert stats["top1"] == pytest.approx(float(top1))
    assert stats["coverage"] == pytest.approx(float(coverage), rel=1e-5)
    assert 0 < stats["coverage"] <= 1 + 1e-6
    # the distillation term is KL(q || p) with q ∝ norms
    q = norms / norms.sum(-1, keepdim=True)
    kl = (q * (q.log() - F.log_softmax(logits.double(), -1))).sum(-1).mean()
    assert float(router.distill.detach()) == pytest.approx(float(kl), rel=1e-4)
    router.distill.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen)
    w = torch.randn(5, 8, generator=gen)
    got = oracle._ridge(x, x @ w.T, ridge=1e-9)
    torch.testing.assert_close(got.float(), w, rtol=1e-4, atol=1e-4)


def _moefied(arch: str = "llama") -> State:
    state = State(model=fresh(arch), groups=list(groups_of(arch)), tokenizer=make_tokenizer())
    return MoEfy(group_size=12, iters=5)(state).state


@pytest.mark.parametrize("method", ["centroid", "fit"])
def test_initialisations_agree_with_the_oracle_more_than_zero(method):
    state = _moefied()
    model, tok = state.model, state.tokenizer
    pp.install(model, state.moe_layout, tau=0.7)
    routers = pp.routers(model)
    from prunegraph.data.blocks import text_blocks

    calib = text_blocks(tok, "wikipedia", "calibration", 32, 8)
    zero = oracle.probe(model, routers, calib)
    gates = [pp.gate_weight(model, e) for e in state.moe_layout]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = oracle.init_routers(model, routers, gates, method, calib, batch_size=4)
    for n, p in model.named_parameters():  # only the routers changed
        assert torch.equal(p, before[n]) == ("prunepath_router" not in n), n
    assert all(r.collect is None and not r.passthrough and not r.observing for r in routers)
    fitted = oracle.probe(model, routers, calib)
    assert fitted["top1"] > max(zero["top1"], fitted["top1_chance"])
    assert fitted["entropy"] < zero["entropy"] == pytest.approx(math.log(routers[0].experts),
                                                                abs=1e-4)
    if method == "fit":
        assert 0 < summary["init_r2"] <= 1


@pytest.mark.slow
def test_distillation_moves_the_router_toward_the_oracle(tmp_path):
    state = _moefied()
    state.run_dir = tmp_path
    PrunePath(warmup_steps=4, train=dict(steps=8, batch_size=2, block_len=16), router_init="zero",
              distill=1.0, entropy=0.0, load_balance=0.0, router_lr=3e-2, lr=0.0,
              train_scope="router", probe_blocks=1)(state)
    rows = [json.loads(line) for line in
            (tmp_path / "prunepath" / "metrics.jsonl").read_text().splitlines()]
    assert all({"top1", "coverage", "distill"} <= set(r) for r in rows)
    assert rows[-1]["distill"] < rows[0]["distill"]
    record = state.metrics["prunepath"]
    assert record["router_init"] == "zero"
    init, trained = record["router_probe"]["init"], record["router_probe"]["trained"]
    assert init["entropy"] == pytest.approx(init["uniform_entropy"], abs=1e-4)
    assert trained["top1"] > init["top1"]
    assert {"top1_mean", "coverage_mean", "distill_mean"} <= set(record["stages"][0])


def test_bad_oracle_settings_error_before_work():
    with pytest.raises(SpecError, match=r"router_init.*'zero' \| 'centroid' \| 'fit', got "):
        PrunePath(router_init="kmeans")
    with pytest.raises(SpecError, match="distill_power must be > 0"):
        PrunePath(distill_power=0.0)
    with pytest.raises(SpecError, match="init_blocks must be >= 1"):
        PrunePath(router_init="fit", init_blocks=0)
    with pytest.raises(SpecError, match="distill must be >= 0"):
        PrunePath(distill=-1.0)
