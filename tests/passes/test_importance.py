"""One-shot importance (magnitude, Wanda, Taylor), budget allocation and the Prune pass.

Groups are written by hand for the tiny random Llama and Qwen3-MoE configs (what the analysis
finds for them), so these tests do not depend on capture. Every expected value is computed here
independently: explicit loops over the slices, hooks of our own, autograd with HF's own loss.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunegraph.data.blocks import text_blocks
from prunegraph.data.models import load_model
from prunegraph.errors import BudgetError, PreconditionError, SpecError
from prunegraph.ir.groups import Constraints, Group, Member
from prunegraph.passes.allocate import allocate, check_budget, max_removable
from prunegraph.passes.importance import score_groups, unit_sums
from prunegraph.passes.prune import Prune
from prunegraph.pipeline.contract import State, get_pass_class


def make_tokenizer():
    from _tiny_tokenizer import make_tokenizer as make

    return make()

# ------------------------------------------------------------------------------ fixtures


@functools.cache
def _model(arch: str) -> nn.Module:
    return load_model(f"random:{arch}", seed=0)[0]


def model_of(arch: str) -> nn.Module:
    return copy.deepcopy(_model(arch))


def _heads(l: int, cfg) -> Group:
    p, hd = f"model.layers.{l}.self_attn", cfg.head_dim
    q = cfg.num_attention_heads // cfg.num_key_value_heads
    return Group(f"{p}:heads", "heads", cfg.num_attention_heads, [
        Member(f"{p}.q_proj.weight", 0, inner=hd),
        Member(f"{p}.k_proj.weight", 0, inner=hd, div=q),
        Member(f"{p}.v_proj.weight", 0, inner=hd, div=q),
        Member(f"{p}.o_proj.weight", 1, inner=hd, role="consumer")],
        Constraints(kv_heads=cfg.num_key_value_heads, q_per_kv=q, head_dim=hd), layer=l,
        params_per_unit=2 * hd * cfg.hidden_size + 2 * hd * cfg.hidden_size / q)


def llama_groups(model) -> list[Group]:
    cfg, out = model.config, []
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.mlp"
        out.append(_heads(l, cfg))
        out.append(Group(f"{p}:channels", "channels", cfg.intermediate_size, [
            Member(f"{p}.gate_proj.weight", 0), Member(f"{p}.up_proj.weight", 0),
            Member(f"{p}.down_proj.weight", 1, role="consumer")], layer=l,
            params_per_unit=3 * cfg.hidden_size))
    out.append(Group("model:hidden", "hidden", cfg.hidden_size,
                     [Member("model.embed_tokens.weight", 1)],
                     Constraints(pinned=True, pinned_reason="norm")))
    return out


def moe_groups(model) -> list[Group]:
    cfg, out = model.config, []
    inter = cfg.moe_intermediate_size
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}.mlp"
        out.append(_heads(l, cfg))
        out.append(Group(f"{p}:experts", "experts", cfg.num_experts, [
            Member(f"{p}.experts.gate_up_proj", 0), Member(f"{p}.experts.down_proj", 0),
            Member(f"{p}.gate.weight", 0, role="router")],
            Constraints(min_units=cfg.num_experts_per_tok, removal="mask_logit"), layer=l))
        out.append(Group(f"{p}.experts:expert_channels", "expert_channels", inter, [
            Member(f"{p}.experts.gate_up_proj", 1, expert_dim=0),
            Member(f"{p}.experts.gate_up_proj", 1, offset=inter, expert_dim=0),
            Member(f"{p}.experts.down_proj", 2, role="consumer", expert_dim=0)],
            Constraints(experts=cfg.num_experts), layer=l))
    return out


def blocks(n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (n, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- unit reduction


def _naive_unit_sums(m: Member, size: int, elem: torch.Tensor) -> torch.Tensor:
    """The Member docstring, literally: unit u owns offset + (u // div) * step + i, split by div."""
    experts = elem.shape[m.expert_dim] if m.expert_dim is not None else 1
    out = torch.zeros(experts, size, dtype=torch.float64)
    for e in range(experts):
        sub = elem.select(m.expert_dim, e) if m.expert_dim is not None else elem
        dim = m.dim - (1 if m.expert_dim is not None and m.expert_dim < m.dim else 0)
        for u in range(size):
            for i in range(m.inner):
                idx = m.offset + (u // m.div) * m.step + i
                out[e, u] += sub.select(dim, idx).double().sum() / m.div
    return out if m.expert_dim is not None else out[0]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), div=st.sampled_from([1, 2, 3]), inner=st.integers(1, 3),
       gap=st.integers(0, 2), offset=st.integers(0, 3), dim=st.integers(0, 2),
       expert=st.booleans(), seed=st.integers(0, 2**16))
def test_unit_sums_follow_member_index_rule(size, div, inner, gap, offset, dim, expert, seed):
    size = size * div
    step = inner + gap
    length = offset + (size // div) * step + 1
    shape = [3, 3, 3]
    shape[dim] = length
    expert_dim = (dim + 1) % 3 if expert else None
    m = Member("w", dim, offset=offset, inner=inner, stride=step, div=div, expert_dim=expert_dim)
    elem = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    got = unit_sums(m, size, elem).double()
    assert torch.allclose(got, _naive_unit_sums(m, size, elem), atol=1e-5)


def test_magnitude_is_group_l2_over_all_members():
    torch.manual_seed(0)
    net = nn.Module()
    net.up = nn.Linear(3, 8, bias=False)       # 4 units of 2 rows
    net.kv = nn.Linear(3, 4, bias=False)       # 2 blocks of 2 rows, each shared by 2 units
    net.down = nn.Linear(8, 5, bias=False)     # 4 units of 2 columns
    g = Group("toy:heads", "heads", 4, [Member("up.weight", 0, inner=2),
                                        Member("kv.weight", 0, inner=2, div=2),
                                        Member("down.weight", 1, inner=2, role="consumer")])
    got = score_groups(net, [g], "magnitude", progress=False)["toy:heads"]
    up, kv, down = net.up.weight, net.kv.weight, net.down.weight
    for u in range(4):
        sq = sum(up[2 * u + i, j] ** 2 for i in range(2) for j in range(3))
        sq += sum(kv[2 * (u // 2) + i, j] ** 2 for i in range(2) for j in range(3)) / 2
        sq += sum(down[r, 2 * u + i] ** 2 for r in range(5) for i in range(2))
        assert got[u].item() == pytest.approx(math.sqrt(sq.item()), rel=1e-5)


# ----------------------------------------------------------------------------------- wanda


def test_wanda_reads_conv1d_weights_as_input_by_output():
    from transformers.pytorch_utils import Conv1D

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(10, 3))   # ids -> input features
            self.fc = Conv1D(4, 3)          # weight [in=3, out=4]

        def forward(self, input_ids):
            return self.fc(self.table[input_ids])

    torch.manual_seed(0)
    toy = Toy()
    nn.init.normal_(toy.fc.bias)
    ids = torch.randint(0, 10, (2, 5))
    x = toy.table[ids]
    g = Group("fc:channels", "channels", 4, [Member("fc.weight", 1), Member("fc.bias", 0)])
    got = score_groups(toy, [g], "wanda", blocks=ids, progress=False)
    norm = x.reshape(-1, 3).pow(2).sum(0).sqrt()
    w, b = toy.fc.weight.detach(), toy.fc.bias.detach()
    want = [sum(abs(w[j, u]) * norm[j] for j in range(3)) + abs(b[u]) * math.sqrt(10)
            for u in range(4)]
    assert torch.allclose(got["fc:channels"], torch.stack(want), rtol=1e-5)


def _input_norms(model, modules, ids):
    """||X_j|| over every token, recorded by hooks of our own."""
    seen = {name: [] for name in modules}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: seen[name].append(args[0].detach().reshape(
            -1, args[0].shape[-1]))) for name in modules]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {name: torch.cat(x).pow(2).sum(0).sqrt() for name, x in seen.items()}


def test_wanda_is_abs_weight_times_input_norm_over_all_members():
    model = model_of("llama")
    groups = llama_groups(model)
    ids = blocks()
    got = score_groups(model, groups, "wanda", blocks=ids, batch_size=2, progress=False)
    assert got.stats["forwards"] == 2 and got.stats["tokens"] == ids.numel()
    assert got.stats["wanda_fallback"] == {}
    p = "model.layers.1"
    norms = _input_norms(model, [f"{p}.mlp.gate_proj", f"{p}.mlp.down_proj",
                                 f"{p}.self_attn.q_proj", f"{p}.self_attn.o_proj"], ids)
    mlp = model.model.layers[1].mlp
    n_in, n_down = norms[f"{p}.mlp.gate_proj"], norms[f"{p}.mlp.down_proj"]
    want = torch.stack([
        (mlp.gate_proj.weight[u].abs() * n_in).sum() + (mlp.up_proj.weight[u].abs() * n_in).sum()
        + (mlp.down_proj.weight[:, u].abs() * n_down[u]).sum() for u in range(96)])
    assert torch.allclose(got[f"{p}.mlp:channels"], want.detach(), rtol=1e-4)
    attn = model.model.layers[1].self_attn
    n_q, n_o = norms[f"{p}.self_attn.q_proj"], norms[f"{p}.self_attn.o_proj"]
    for u in range(4):
        rows, kv = slice(16 * u, 16 * u + 16), slice(16 * (u // 2), 16 * (u // 2) + 16)
        want_u = ((attn.q_proj.weight[rows].abs() * n_q).sum()
                  + ((attn.k_proj.weight[kv].abs() + attn.v_proj.weight[kv].abs()) * n_q).sum() / 2
                  + (attn.o_proj.weight[:, rows].abs() * n_o[rows]).sum())
        assert got[f"{p}.self_attn:heads"][u].item() == pytest.approx(want_u.item(), rel=1e-4)
    assert all(not m._forward_hooks for m in model.modules())


def test_wanda_falls_back_to_abs_weight_for_fused_experts():
    model = model_of("qwen3-moe")
    groups = moe_groups(model)
    got = score_groups(model, groups, "wanda", blocks=blocks(2, 8), progress=False)
    fallback = got.stats["wanda_fallback"]
    assert set(fallback) == {g.name for g in groups if g.kind != "heads"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fallback["model.layers.0.mlp:experts"]
    ch = got["model.layers.0.mlp.experts:expert_channels"]
    assert ch.shape == (8, 32)
    experts = model.model.layers[0].mlp.experts
    e, c = 5, 7
    want = (experts.gate_up_proj[e, c].abs().sum() + experts.gate_up_proj[e, 32 + c].abs().sum()
            + experts.down_proj[e, :, c].abs().sum())
    assert ch[e, c].item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- taylor


def test_taylor_equals_weight_times_autograd_gradient():
    model = model_of("llama")
    groups = llama_groups(model)
    ids = blocks(2, 12)
    reference = copy.deepcopy(model)
    loss = reference(input_ids=ids, labels=ids).loss    # HF's own shifted next-token CE
    loss.backward()
    got = score_groups(model, groups, "taylor", blocks=ids, batch_size=2, progress=False)
    mlp = reference.model.layers[0].mlp
    sal = {n: (w.weight * w.weight.grad).abs() for n, w in
           (("g", mlp.gate_proj), ("u", mlp.up_proj), ("d", mlp.down_proj))}
    want = torch.stack([sal["g"][u].sum() + sal["u"][u].sum() + sal["d"][:, u].sum()
                        for u in range(96)])
    assert torch.allclose(got["model.layers.0.mlp:channels"], want.detach(), rtol=1e-3,
                          atol=1e-7)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_taylor_does_not_depend_on_batch_size():
    model = model_of("llama")
    groups = llama_groups(model)
    ids = blocks(3, 10, seed=1)
    one = score_groups(model, groups, "taylor", blocks=ids, batch_size=1, progress=False)
    two = score_groups(model, groups, "taylor", blocks=ids, batch_size=2, progress=False)
    assert one.stats["forwards"] == 3 and two.stats["forwards"] == 2
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-3, atol=1e-8)


def test_scoring_inputs_are_checked():
    model = model_of("llama")
    with pytest.raises(SpecError, match="magnitude"):
        score_groups(model, llama_groups(model), "magnitdue")
    with pytest.raises(PreconditionError, match="calibration"):
        score_groups(model, llama_groups(model), "wanda", blocks=None)
    bad = Group("x:channels", "channels", 2, [Member("nope.weight", 0)])
    with pytest.raises(PreconditionError, match="nope.weight"):
        score_groups(model, [bad], "magnitude")


# ------------------------------------------------------------------------------ allocation


def _random_scores(groups, model, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        if g.prunable:
            shape = (model.config.num_experts, g.size) if g.kind == "expert_channels" else (
                g.size,)
            out[g.name] = torch.rand(shape, generator=gen) * (1 + 5 * torch.rand(1, generator=gen))
    return out


def _removed_llama(model, keep) -> int:
    """Parameters removed, counted per projection with the config's shapes."""
    cfg, h, hd = model.config, model.config.hidden_size, model.config.head_dim
    removed = 0
    for l in range(cfg.num_hidden_layers):
        heads = keep[f"model.layers.{l}.self_attn:heads"]
        kv = torch.unique(heads // (cfg.num_attention_heads // cfg.num_key_value_heads))
        removed += 2 * (cfg.num_attention_heads - len(heads)) * hd * h          # q rows, o cols
        removed += 2 * (cfg.num_key_value_heads - len(kv)) * hd * h             # k, v rows
        removed += 3 * (cfg.intermediate_size - len(keep[f"model.layers.{l}.mlp:channels"])) * h
    return removed


def _decoder_total(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers."))


def _check_gqa(groups, keep):
    for g in groups:
        if g.kind == "heads":
            q = g.constraints.q_per_kv
            per_kv = torch.bincount(keep[g.name] // q)
            per_kv = per_kv[per_kv > 0]
            assert len(per_kv) >= 1 and bool((per_kv == per_kv[0]).all()), keep[g.name]


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.02, 0.6), seed=st.integers(0, 10**6),
       strategy=st.sampled_from(["global", "uniform"]))
def test_allocation_hits_target_and_keeps_gqa_structure(sparsity, seed, strategy):
    model = _model("llama")
    groups = llama_groups(model)
    keep = allocate(groups, _random_scores(groups, model, seed), sparsity, model=model,
                    strategy=strategy)
    assert set(keep) == {g.name for g in groups if g.prunable}
    target = sparsity * _decoder_total(model)
    removed = _removed_llama(model, keep)
    assert removed == keep.stats["removed"]
    one_unit = max(g.params_per_unit for g in groups)
    layers = model.config.num_hidden_layers if strategy == "uniform" else 1
    assert target <= removed < target + layers * one_unit
    _check_gqa(groups, keep)
    if strategy == "uniform":
        for kind in ("heads", "channels"):
            assert len({len(keep[g.name]) for g in groups if g.kind == kind}) == 1


def test_global_allocation_prefers_low_scores_across_layers():
    model = _model("llama")
    groups = llama_groups(model)
    scores = _random_scores(groups, model, 0)
    scores["model.layers.0.mlp:channels"] = scores["model.layers.0.mlp:channels"] * 100
    keep = allocate(groups, scores, 0.2, model=model, normalize="kind")
    assert keep.stats["normalize"] == "kind"
    assert len(keep["model.layers.0.mlp:channels"]) > len(keep["model.layers.1.mlp:channels"])
    low = scores["model.layers.1.mlp:channels"].argsort()[:5]
    assert not set(low.tolist()) & set(keep["model.layers.1.mlp:channels"].tolist())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), factor=st.floats(1e-3, 1e3))
def test_group_normalisation_ignores_each_groups_scale(seed, factor):
    model = _model("llama")
    groups = llama_groups(model)
    scores = _random_scores(groups, model, seed)
    scaled = dict(scores)
    scaled["model.layers.0.mlp:channels"] = scores["model.layers.0.mlp:channels"] * factor
    a = allocate(groups, scores, 0.3, model=model, normalize="group")
    b = allocate(groups, scaled, 0.3, model=model, normalize="group")
    assert a.stats["normalize"] == "group"
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_auto_normalisation_follows_the_criterion():
    from prunegraph.passes.importance import Scores

    model = _model("llama")
    groups = llama_groups(model)
    raw = _random_scores(groups, model, 1)
    for criterion, want in (("taylor", "kind"), ("wanda", "group"), ("magnitude", "group")):
        keep = allocate(groups, Scores(raw, stats={"criterion": criterion}), 0.3, model=model)
        assert keep.stats["normalize"] == want
    with pytest.raises(SpecError, match="normalize"):
        allocate(groups, raw, 0.3, model=model, normalize="layer")


def test_allocation_at_the_limit_keeps_minimum_units():
    model = _model("llama")
    groups = llama_groups(model)
    most, total = max_removable(groups, model)
    cfg, h, hd = model.config, model.config.hidden_size, model.config.head_dim
    per_layer = 2 * 3 * hd * h + 2 * 1 * hd * h + 3 * (cfg.intermediate_size - 1) * h
    assert most == cfg.num_hidden_layers * per_layer and total == _decoder_total(model)
    keep = allocate(groups, _random_scores(groups, model, 3), most / total - 1e-6, model=model)
    for g in groups:
        if g.prunable:
            assert len(keep[g.name]) == 1


def test_moe_allocation_respects_top_k_and_equal_expert_channels():
    from prunegraph.plan.plan import Plan

    model = _model("qwen3-moe")
    groups = moe_groups(model)
    scores = _random_scores(groups, model, 7)
    most, total = max_removable(groups, model)
    keep = allocate(groups, scores, 0.9 * most / total, model=model)
    cfg, h = model.config, model.config.hidden_size
    removed = 0
    for l in range(cfg.num_hidden_layers):
        experts = keep[f"model.layers.{l}.mlp:experts"]
        channels = keep[f"model.layers.{l}.mlp.experts:expert_channels"]
        assert len(experts) >= cfg.num_experts_per_tok
        assert channels.shape[0] == cfg.num_experts and channels.shape[1] >= 1
        kept = len(experts) * h + 3 * h * channels.shape[1] * len(experts)  # router + experts
        removed += cfg.num_experts * (h + 3 * h * cfg.moe_intermediate_size) - kept
        heads = keep[f"model.layers.{l}.self_attn:heads"]
        removed += 2 * (4 - len(heads)) * 16 * h + 2 * (2 - len(torch.unique(heads // 2))) * 16 * h
    assert removed == keep.stats["removed"] >= 0.9 * most
    plan = Plan.from_keep(groups, keep, model=model, scores=scores, repair=False)
    for name, kept in keep.items():
        assert torch.equal(plan[name].keep, kept)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "a lot"])
def test_sparsity_outside_open_interval_is_a_budget_error(bad):
    model = _model("llama")
    with pytest.raises(BudgetError, match=r"\(0, 1\)"):
        allocate(llama_groups(model), {}, bad, model=model)
    with pytest.raises(BudgetError, match=r"\(0, 1\)"):
        Prune(sparsity=bad) if isinstance(bad, float) else check_budget([], bad, model)


def test_impossible_budget_names_the_maximum():
    model = _model("llama")
    most, total = max_removable(llama_groups(model), model)
    with pytest.raises(BudgetError, match=f"maximum achievable sparsity is {most / total:.4f}"):
        allocate(llama_groups(model), {}, 0.95, model=model)
    with pytest.raises(BudgetError, match="maximum"):
        check_budget([g for g in llama_groups(model) if g.kind == "heads"], 0.5, model)


class _Untouchable:
    """A tokenizer that fails the test if the pass reaches calibration."""

    bos_token_id = eos_token_id = None

    def __call__(self, *args, **kwargs):
        raise AssertionError("calibration text was tokenized before the budget was checked")


def test_prune_pass_checks_the_budget_before_any_work(monkeypatch):
    model = model_of("llama")
    calls = {"forward": 0, "hooks": 0}
    real_forward = model.forward

    def forward(*args, **kwargs):
        calls["forward"] += 1
        return real_forward(*args, **kwargs)

    real_hook = nn.Module.register_forward_hook

    def hook(self, *args, **kwargs):
        calls["hooks"] += 1
        return real_hook(self, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(nn.Module, "register_forward_hook", hook)
    state = State(model=model, tokenizer=_Untouchable(), groups=llama_groups(model))
    with pytest.raises(BudgetError, match="maximum achievable"):
        Prune(criterion="wanda", sparsity=0.95)(state)
    assert calls == {"forward": 0, "hooks": 0}
    assert not state.has("plan")


# ------------------------------------------------------------------------------ Prune pass


def _docs(tmp_path):
    """Six documents, each written in its own letters, so blocks reveal their documents."""
    path = tmp_path / "docs.jsonl"
    letters = ["ab", "cd", "ef", "gh", "ij", "kl"]
    path.write_text("\n".join(json.dumps({"title": f"d{i}", "text": (s + " ") * 300})
                              for i, s in enumerate(letters)))
    return str(path), letters


def test_calibration_blocks_come_from_the_calibration_split_only(tmp_path):
    from prunegraph.data.text import load_documents, split_documents

    source, _ = _docs(tmp_path)
    tok = make_tokenizer()
    _, held_out = split_documents(load_documents(source))
    ids = text_blocks(tok, source, "calibration", 32, 8)
    assert ids.shape == (8, 32)
    text = "".join(tok.convert_ids_to_tokens(ids.flatten().tolist()))
    for doc in held_out:
        assert doc.text[0] not in text


def test_prune_pass_provides_a_plan_meeting_the_budget(tmp_path):

    source, _ = _docs(tmp_path)
    model = model_of("llama")
    groups = llama_groups(model)
    state = State(model=model, tokenizer=make_tokenizer(), groups=groups)
    result = Prune(criterion="wanda", sparsity=0.3, calib_blocks=4, block_len=32,
                   source=source, strategy="uniform")(state)
    plan = result.state.plan
    stats = result.stats
    assert stats["removed"] >= 0.3 * _decoder_total(model) and stats["forwards"] == 1
    keep = {pg.name: pg.keep for pg in plan.groups}
    assert _removed_llama(model, keep) == stats["removed"]
    _check_gqa(groups, keep)
    assert state.metrics["prune"]["criterion"] == "wanda"
    assert get_pass_class("Prune") is Prune
