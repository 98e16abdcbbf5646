"""MoEfication: balanced k-means, contiguous experts, an unchanged model, errors before work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _pruning_fixtures import fresh, groups_of
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.errors import SpecError
from prunegraph.passes.prunepath.moefy import (
    MoEfy,
    balanced_kmeans,
    channel_features,
    expert_sizes,
    feature_member,
    moefy,
)
from prunegraph.pipeline.contract import State

ARCHS = ["llama", "qwen3", "phi3", "gpt2"]



def _group_size(arch: str) -> int:
    return 32 if arch == "gpt2" else 12  # widths 256 and 96: 8 experts


def _ids() -> torch.Tensor:
    return torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_permuted_model_equals_original(arch):
    """float64, so the only difference (the down projection's summation order) is ~1e-15."""
    model = fresh(arch).double()
    groups = list(groups_of(arch))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    layout = moefy(model, groups, _group_size(arch), seed=0, iters=10)
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "MoEfy permuted nothing"
    assert all(".mlp." in n for n in changed)
    assert len(layout) == len([g for g in groups if g.kind == "channels"])
    for entry in layout:
        perm = entry["permutation"]
        assert sorted(perm) == list(range(entry["width"]))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_experts_are_contiguous_clusters(arch):
    """After MoEfy, channels [e*G, (e+1)*G) are the rows k-means put in cluster e, and every
    member of the group moved the same way (gate rows, up rows, down columns)."""
    model = fresh(arch)
    groups = [g for g in groups_of(arch) if g.kind == "channels"]
    G = _group_size(arch)
    feats_before = [channel_features(model, g).clone() for g in groups]
    consumer_before = []
    for g in groups:
        c = next(m for m in g.members if m.role == "consumer")
        consumer_before.append(model.get_parameter(c.param).detach().clone())
    layout = moefy(model, list(groups_of(arch)), G, seed=3, iters=10)
    for g, fb, cb, entry in zip(groups, feats_before, consumer_before, layout):
        perm = torch.tensor(entry["permutation"])
        labels = balanced_kmeans(fb, expert_sizes(g.size, G), seed=3 + groups.index(g), iters=10)
        assert torch.equal(labels[perm], torch.arange(g.size) // G)
        assert torch.equal(channel_features(model, g), fb[perm])
        c = next(m for m in g.members if m.role == "consumer")
        assert torch.equal(model.get_parameter(c.param).detach(), cb.index_select(c.dim, perm))


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 9), g=st.integers(1, 7), d=st.integers(1, 6), seed=st.integers(0, 99))
def test_balanced_kmeans_gives_exactly_g_per_cluster(k, g, d, seed):
    x = torch.randn(k * g, d, generator=torch.Generator().manual_seed(seed))
    labels = balanced_kmeans(x, [g] * k, seed=seed, iters=5)
    assert labels.shape == (k * g,)
    assert torch.bincount(labels, minlength=k).tolist() == [g] * k


def test_balanced_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    k, g, d = 6, 8, 16
    centers = torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=1)
    truth = torch.arange(k).repeat_interleave(g)
    x = centers[truth] + 0.05 * torch.randn(k * g, d, generator=gen)
    shuffle = torch.randperm(k * g, generator=gen)
    labels = balanced_kmeans(x[shuffle], [g] * k, seed=1)
    truth = truth[shuffle]
    # same partition: each found cluster is exactly one true cluster
    for j in range(k):
        assert truth[labels == j].unique().numel() == 1


def test_balanced_kmeans_is_seeded_and_reproducible():
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    a = balanced_kmeans(x, [12] * 8, seed=5)
    b = balanced_kmeans(x, [12] * 8, seed=5)
    assert torch.equal(a, b)
    m1, m2 = fresh("llama"), fresh("llama")
    l1 = moefy(m1, list(groups_of("llama")), 12, seed=7)
    l2 = moefy(m2, list(groups_of("llama")), 12, seed=7)
    assert [e["permutation"] for e in l1] == [e["permutation"] for e in l2]
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_ragged_last_expert():
    model = fresh("llama").double()
    groups = list(groups_of("llama"))
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    layout = moefy(model, groups, 40, ragged=True, iters=5)  # 96 = 40 + 40 + 16
    assert expert_sizes(96, 40, ragged=True) == [40, 40, 16]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=_ids()).logits, ref, atol=1e-12, rtol=0)
    assert layout[0]["group_size"] == 40


def test_group_size_not_dividing_errors_before_work():
    model = fresh("llama")
    before = [p.detach().clone() for p in model.parameters()]
    state = State(model=model, groups=list(groups_of("llama")))
    with pytest.raises(SpecError, match="does not divide the MLP width 96"):
        MoEfy(group_size=40)(state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not state.has("plan")
    with pytest.raises(SpecError, match="group_size must be >= 1"):
        MoEfy(group_size=0)
    with pytest.raises(SpecError, match="larger than the MLP width"):
        expert_sizes(96, 200)


def test_pass_provides_layout_and_identity_plan():
    model = fresh("qwen3")
    state = MoEfy(group_size=12, iters=5)(State(model=model, groups=list(groups_of("qwen3")))).state
    assert state.plan.groups == [] and state.plan.fingerprint is not None
    entry = state.moe_layout[0]
    assert entry["producer"].endswith("gate_proj") and entry["consumer"].endswith("down_proj")
    assert entry["router"].endswith("mlp.prunepath_router")
    assert state.metrics["moefy"]["experts"] == 8


def test_feature_member_is_the_gate():
    phi = [g for g in groups_of("phi3") if g.kind == "channels"][0]
    assert feature_member(phi).offset == 0 and "gate_up" in feature_member(phi).param
    gpt = [g for g in groups_of("gpt2") if g.kind == "channels"][0]
    assert feature_member(gpt).param.endswith("c_fc.weight")
    assert np.isfinite(channel_features(fresh("gpt2"), gpt).numpy()).all()
