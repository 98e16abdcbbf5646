"""Kept widths the hardware runs fast: ``round_to`` ``auto`` (resolved per device and dtype),
``latency`` (measured GEMM steps, cached) and integers, in Prune, Finalize and Train's polish;
budgets still met, sliced == gated for the plans they make."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math

import pytest
import torch
from _gate_fixtures import corpus, one_thread  # noqa: F401
from _paths import ROOT
from _tiny_tokenizer import make_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunegraph.errors import BudgetError, SpecError
from prunegraph.passes._param_space import param_space, removed_params
from prunegraph.passes._widths import AUTO_MIN_WIDTHS, _fast_side, resolve_widths, rounding_applies
from prunegraph.passes.prune import Prune
from prunegraph.pipeline.contract import State
from prunegraph.plan import latency as latency_mod
from prunegraph.plan.gating import apply_gates
from prunegraph.plan.latency import Gemm, LatencyTable
from prunegraph.plan.slicing import apply_plan
from prunegraph.plan.widths import WIDTH_RULES, check_round_to, resolve_round_to, runs_on

# Tiny configs whose channel groups are wide enough for the CPU's multiple (32) with room to
# spare: MLP 256 (7 smaller multiples of 32), MoE experts 160 (4), shared expert 192 (5).
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2-moe": dict(model_type="qwen2_moe", vocab_size=256, hidden_size=64,
                      intermediate_size=256, moe_intermediate_size=160,
                      shared_expert_intermediate_size=192, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256),
}


@functools.cache
def _base(name: str):
    """The model of ``CONFIGS[name]`` and its groups (analysed once, cached on disk as the
    random architectures' groups are)."""
    from _pruning_fixtures import _CACHE, _analysis_key
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunegraph.ir.groups import Group

    kw = dict(CONFIGS[name])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = _CACHE / f"widths-{name}-{_analysis_key(json.dumps(CONFIGS[name], sort_keys=True))}.json"
    if path.exists():
        return model, tuple(Group.from_dict(d) for d in json.loads(path.read_text()))
    from prunegraph.ir.analysis import analyze

    groups = tuple(analyze(model).groups)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps([g.to_dict() for g in groups]))
    path.with_suffix(".tmp").replace(path)
    return model, groups


def _state(name: str) -> State:
    model, groups = _base(name)
    return State(model=copy.deepcopy(model), tokenizer=make_tokenizer(), groups=list(groups))


def _channel_counts(plan) -> dict[str, int]:
    return {pg.name: pg.kept for pg in plan.groups if rounding_applies(pg.group)}


def _logits(model, seed=0):
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _sliced_equals_gated(name: str, plan) -> None:
    model, groups = _base(name)
    gated, sliced = copy.deepcopy(model), copy.deepcopy(model)
    apply_gates(gated, list(groups), plan.gate_values())
    apply_plan(sliced, plan)
    torch.testing.assert_close(_logits(sliced), _logits(gated), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("device,dtype,multiple", [
    ("cuda", "bfloat16", 64), ("cuda", "float16", 64), ("cuda", "float32", 64),
    ("cpu", "float32", 32), ("cpu", "bfloat16", 32), ("mps", "float16", 64)])
def test_auto_resolves_from_the_device_and_dtype(device, dtype, multiple):
    rt = resolve_round_to("auto", device=device, dtype=dtype)
    assert (rt.multiple, rt.device, rt.dtype, rt.explicit) == (multiple, device, dtype, False)
    assert rt.source == next(r for r in WIDTH_RULES if r.matches(device, dtype)).source
    assert resolve_round_to("latency", device=device, dtype=dtype).multiple == multiple
    given_ = resolve_round_to(8, device=device, dtype=dtype)
    assert (given_.multiple, given_.source, given_.explicit) == (8, "given", True)
    assert resolve_round_to(1, device=device, dtype=dtype).multiple == 1


def test_auto_reads_the_model_and_meta_models_run_on_this_machine(monkeypatch):
    model, _ = _base("llama")
    assert runs_on(model) == ("cpu", "float32")
    assert runs_on(copy.deepcopy(model).to(torch.bfloat16)) == ("cpu", "bfloat16")
    meta = copy.deepcopy(model).to("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs_on(meta) == ("cuda", "float32")
    assert resolve_round_to("auto", model=meta.to(torch.bfloat16)).multiple == 64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs_on(meta) == ("cpu", "bfloat16")
    assert resolve_round_to("auto", model=meta).multiple == 32


def test_every_rule_names_its_source_and_the_cpu_rule_is_the_measured_multiple():
    for rule in WIDTH_RULES:
        assert rule.multiple >= 1 and rule.multiple & (rule.multiple - 1) == 0
        assert rule.source.startswith(("measured", "assumed"))
    assert WIDTH_RULES[-1].device == "" and not WIDTH_RULES[-1].dtypes  # everything resolves
    results = ROOT / "benchmarks" / "results"
    cpu = json.loads((results / "cpu_speed.json").read_text())
    assert resolve_round_to("auto", device="cpu", dtype="float32").multiple == \
        cpu["cpu_widths"]["wanted_multiple"]


@pytest.mark.parametrize("bad", [0, -64, "fast", True, 8.5, None])
def test_bad_round_to_is_a_spec_error_before_any_work(bad):
    with pytest.raises(SpecError, match="round_to"):
        check_round_to(bad)
    with pytest.raises(SpecError, match="round_to"):
        Prune(round_to=bad)


def test_passes_default_to_auto():
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.train import Train

    assert Prune().round_to == Finalize().round_to == Train().round_to == "auto"
    assert Prune(round_to="latency").round_to == "latency"
    assert Prune(round_to=1).round_to == 1


# ----------------------------------------------------------------------------- per group


def test_auto_falls_back_for_small_groups_and_never_errors():
    model, groups = _base("llama")
    big = resolve_widths(groups, model, resolve_round_to("auto", device="cuda", dtype="bfloat16"))
    mlp = [g for g in groups if g.kind == "channels"]
    # 256 channels have only 3 multiples of 64 below them: auto takes 32 (7 of them)
    assert all(big.multiples[g.name] == 32 for g in mlp) and set(big.fallback) == {
        g.name for g in mlp}
    assert all(big.counts(g, 1) == [256, 224, 192, 160, 128, 96, 64, 32] for g in mlp)
    cpu = resolve_widths(groups, model, "auto")
    assert all(cpu.multiples[g.name] == 32 for g in mlp) and not cpu.fallback
    from _pruning_fixtures import fresh, groups_of

    tiny = resolve_widths(groups_of("llama"), fresh("llama"), "auto")  # 96 channels
    for name, r in tiny.multiples.items():
        assert r == 16 and tiny.fallback[name] == 16
    assert all(not rounding_applies(g) for g in groups if g.name not in cpu.multiples)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 600), floor=st.integers(1, 40), log_m=st.integers(0, 7))
def test_auto_gives_every_group_enough_aligned_widths(size, floor, log_m):
    from prunegraph.ir.groups import Constraints, Group

    floor = min(floor, size)
    g = Group("g:channels", "channels", size, [], Constraints(min_units=floor))
    rt = resolve_round_to("auto", device="cuda", dtype="bfloat16")
    rt = type(rt)("auto", 2 ** log_m, "cuda", "bfloat16", "test")
    w = resolve_widths([g], None, rt)
    r = w.multiples[g.name]
    counts = w.counts(g, floor)
    assert counts[0] == size and all(k % r == 0 and floor <= k < size for k in counts[1:])
    if r < rt.multiple:  # fell back: the rule's multiple left too few widths, this one enough
        assert len(_multiples_below(size, rt.multiple, floor)) < AUTO_MIN_WIDTHS
        assert r == 1 or len(counts) - 1 >= AUTO_MIN_WIDTHS
        assert g.name in w.fallback
    elif r > 1:
        assert len(counts) - 1 >= AUTO_MIN_WIDTHS and g.name not in w.fallback
    assert w.nearest(g, size / 2) in counts


def _multiples_below(size, r, floor):
    return [k for k in range(r, size, r) if k >= floor]


def test_explicit_round_to_larger_than_every_group_is_an_error_with_the_fix():
    state = _state("llama")
    with pytest.raises(BudgetError, match=r"round_to=512 leaves no smaller size.*round_to: auto"):
        Prune(criterion="magnitude", sparsity=0.2, round_to=512)(state)
    with pytest.raises(BudgetError, match="round_to=512"):
        resolve_widths(state.groups, state.model, 512)
    assert "plan" not in state


def test_explicit_round_to_some_groups_cannot_honour_is_a_warning_naming_them(caplog):
    state = _state("qwen2-moe")  # experts' channels 160, shared expert 192, no MLP of 256
    caplog.set_level(logging.WARNING, logger="prunegraph")
    state = Prune(criterion="magnitude", sparsity=0.2, round_to=176)(state).state
    text = caplog.text
    assert "round_to=176 leaves no smaller size" in text and "experts:expert_channels" in text
    counts = _channel_counts(state.plan)
    assert all(k == 160 for n, k in counts.items() if "experts:" in n)       # kept whole
    assert all(k in (192, 176) for n, k in counts.items() if "shared" in n)


# ----------------------------------------------------------------------------- passes


@pytest.mark.parametrize("name", ["llama", "qwen2-moe"])
@pytest.mark.parametrize("strategy", ["global", "uniform"])
def test_prune_under_auto_keeps_aligned_counts_and_meets_the_budget(name, strategy, tmp_path):
    state = _state(name)
    state.run_dir = tmp_path
    state = Prune(criterion="magnitude", sparsity=0.3, strategy=strategy)(state).state
    counts = _channel_counts(state.plan)
    assert counts and all(k % 32 == 0 for k in counts.values()), counts
    assert any(k < g.size for g in state.groups for n, k in counts.items() if n == g.name)
    total = param_space(state.model, "decoder").total
    assert state.plan.report["params_removed"] >= 0.3 * total
    m = state.metrics["prune"]
    assert m["widths"]["requested"] == "auto" and m["widths"]["multiple"] == 32
    assert m["widths"]["device"] == "cpu" and m["round_to"] == "auto (32 on cpu float32)"
    report = json.loads((tmp_path / "widths.json").read_text())["Prune"]
    assert {n: r["kept"] for n, r in report["groups"].items()} == counts
    _sliced_equals_gated(name, state.plan)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(sparsity=st.floats(0.05, 0.6), strategy=st.sampled_from(["global", "uniform"]),
       name=st.sampled_from(sorted(CONFIGS)))
def test_allocation_under_auto_is_aligned_and_exact_for_any_budget(sparsity, strategy, name):
    from prunegraph.passes.allocate import allocate
    from prunegraph.passes.importance import score_groups

    model, groups = _base(name)
    scores = score_groups(model, list(groups), "magnitude")
    widths = resolve_widths(groups, model, "auto")
    keep = allocate(groups, scores, sparsity, model=model, strategy=strategy, round_to=widths)
    for g in groups:
        if g.name in keep and rounding_applies(g):
            k = keep[g.name].shape[-1]
            assert k == g.size or k % widths.multiples[g.name] == 0
    s = keep.stats
    assert s["removed"] >= sparsity * s["total"]
    assert s["removed"] == removed_params(groups, keep, param_space(model, "decoder"))


def test_prune_under_mocked_cuda_resolves_64_and_names_the_groups_too_small(monkeypatch, caplog):
    import prunegraph.plan.widths as widths_mod

    monkeypatch.setattr(widths_mod, "runs_on", lambda model: ("cuda", "bfloat16"))
    caplog.set_level(logging.WARNING, logger="prunegraph")
    state = Prune(criterion="magnitude", sparsity=0.3)(_state("llama")).state
    m = state.metrics["prune"]["widths"]
    assert (m["multiple"], m["device"], m["dtype"]) == (64, "cuda", "bfloat16")
    # 256 channels have 3 smaller multiples of 64: auto takes 32 for them, and says so
    assert "too small for multiples of 64 and use 32 instead" in caplog.text
    assert "model.layers.0.mlp:channels" in caplog.text
    assert all(k % 32 == 0 for k in _channel_counts(state.plan).values())


def _gated(name: str, sparsity=0.3, **kw) -> State:
    from prunegraph.passes.gates.insert import Gate

    return Gate(family="ddp", sparsity=sparsity, lr=0.1, **kw)(_state(name)).state


@pytest.mark.parametrize("name", ["llama", "qwen2-moe"])
def test_finalize_and_polish_under_auto_keep_aligned_counts(name, corpus):
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.slice import Slice
    from prunegraph.passes.train import Train

    state = _gated(name)
    Train(steps=6, polish_steps=2, batch_size=2, block_len=16, warmup=1, source=corpus,
          plots=False)(state)
    assert state.metrics["train"]["round_to"] == "auto (32 on cpu float32)"
    polished = {n: int((v != 0).reshape(-1, v.shape[-1]).sum(-1)[0])
                for n, v in state.trained_gates.items()}
    Finalize()(state)
    counts = _channel_counts(state.plan)
    assert counts and all(k % 32 == 0 for k in counts.values()), counts
    assert all(polished[n] == k for n, k in counts.items())  # the polish trained this plan
    total = param_space(state.model, "decoder").total
    assert state.plan.report["params_removed"] >= 0.3 * total
    assert state.metrics["finalize"]["widths"]["multiple"] == 32
    x = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = state.model(input_ids=x).logits
    Slice()(state)
    with torch.no_grad():
        sliced = state.model(input_ids=x).logits
    torch.testing.assert_close(sliced, gated, atol=1e-5, rtol=1e-5)


def test_units_budget_under_auto_removes_at_least_its_units_with_aligned_moves():
    state = _gated("llama", sparsity=0.25, budget="units")
    fam = state.gate_family
    gen = torch.Generator().manual_seed(1)
    values = {n: torch.rand(v.shape, generator=gen) for n, v in fam.final_values().items()}
    plan = fam.finalize(values, mode="topk", model=state.model)
    channels = [pg for pg in plan.groups if pg.group.kind == "channels"]
    target = 0.25 * sum(pg.group.size for pg in channels)
    removed = sum(pg.group.size - pg.kept for pg in channels)
    assert all(pg.kept % 32 == 0 for pg in channels)
    assert target <= removed < target + 32
    exact = fam.finalize(values, mode="topk", model=state.model, round_to=1)
    assert sum(pg.kept for pg in exact.groups if pg.group.kind == "channels") == \
        round(0.75 * sum(pg.group.size for pg in channels))


def test_polish_plan_is_kept_when_some_rounded_groups_are_not_gated(corpus, caplog):
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.train import Train

    state = _gated("qwen2-moe", kinds=["heads", "expert_channels"])  # shared expert left dense
    Train(steps=4, polish_steps=2, batch_size=2, block_len=16, warmup=1, source=corpus,
          plots=False)(state)
    polished = {n: v != 0 for n, v in state.trained_gates.items()}
    caplog.set_level(logging.WARNING, logger="prunegraph")
    Finalize()(state)
    assert "Train polished under" not in caplog.text
    planned = state.plan.gate_values()
    assert all(torch.equal(polished[n], planned[n] != 0) for n in polished)


def test_finalize_warns_when_the_polish_used_other_widths(corpus, caplog):
    from prunegraph.passes.finalize import Finalize
    from prunegraph.passes.train import Train

    state = _gated("llama")
    Train(steps=4, polish_steps=2, batch_size=2, block_len=16, warmup=1, source=corpus,
          plots=False)(state)
    caplog.set_level(logging.WARNING, logger="prunegraph")
    Finalize(round_to=1)(state)
    assert "Train polished under round_to=auto (32 on cpu float32) but Finalize uses" in caplog.text


# ----------------------------------------------------------------------------- latency table


class CountingTimer:
    """A fake timer: a GEMM's 'time' is its output's 64-column tiles (a step every 64)."""

    def __init__(self, step: int = 64):
        self.calls, self.step = 0, step

    def __call__(self, fn, device):
        self.calls += 1
        y = fn()
        return 1e-6 * math.ceil(y.shape[1] / self.step) * y.shape[0]


def test_latency_table_caches_per_device_dtype_and_shape(tmp_path):
    timer = CountingTimer()
    table = LatencyTable("cpu", "float32", timer=timer, cache=tmp_path, name="Test GPU/1")
    a, b = Gemm(1, 100, 64), Gemm(512, 100, 64)
    first = table.seconds([a, b, a])
    assert (timer.calls, table.misses, table.hits) == (2, 2, 0)
    assert first == {a: 2e-6, b: 2e-6 * 512}
    path = tmp_path / "Test_GPU_1.json"
    data = json.loads(path.read_text())
    assert data["device"] == "Test GPU/1" and set(data["entries"]) == {
        "float32 t=1 out=100 in=64", "float32 t=512 out=100 in=64"}
    again = LatencyTable("cpu", "float32", timer=timer, cache=tmp_path, name="Test GPU/1")
    assert again.seconds([a]) == {a: first[a]} and (again.hits, again.misses) == (1, 0)
    # a new process: nothing in memory, the file answers
    fresh_timer = CountingTimer()
    disk = LatencyTable("cpu", "float32", timer=fresh_timer, cache=tmp_path, name="Test GPU/1")
    assert disk.seconds([a, b]) == first and fresh_timer.calls == 0 and disk.hits == 2
    # another dtype, shape or device is measured again, into its own entry or file
    assert LatencyTable("cpu", "bfloat16", timer=fresh_timer, cache=tmp_path,
                        name="Test GPU/1").seconds([a]) and fresh_timer.calls == 1
    LatencyTable("cpu", "float32", timer=fresh_timer, cache=tmp_path,
                 name="Test GPU/1").seconds([Gemm(1, 128, 64)])
    assert fresh_timer.calls == 2
    other = LatencyTable("cpu", "float32", timer=fresh_timer, cache=tmp_path, name="Other GPU")
    other.seconds([a])
    assert fresh_timer.calls == 3 and (tmp_path / "Other_GPU.json").exists()
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4 and "bfloat16 t=1 out=100 in=64" in entries


def test_a_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / "Damaged.json").write_text("{not json")
    timer = CountingTimer()
    table = LatencyTable("cpu", "float32", timer=timer, cache=tmp_path, name="Damaged")
    table.seconds([Gemm(1, 64, 64)])
    assert timer.calls == 1 and json.loads((tmp_path / "Damaged.json").read_text())["entries"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEGRAPH_CACHE", str(tmp_path / "pg"))
    assert latency_mod.cache_dir() == tmp_path / "pg"
    monkeypatch.delenv("PRUNEGRAPH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert latency_mod.cache_dir() == tmp_path / "xdg" / "prunegraph"


def test_fast_side_keeps_the_widest_width_of_each_plateau():
    widths = [256, 224, 192, 160, 128, 96, 64, 32]
    steps = [4, 4, 3, 3, 2, 2, 1, 1]
    assert _fast_side(widths, steps, 0.01) == [256, 192, 128, 64]
    assert _fast_side(widths, [8, 7, 6, 5, 4, 3, 2, 1], 0.01) == widths   # linear: all of them
    assert _fast_side(widths, [4, 4.01, 3, 3, 2, 2, 1, 1], 0.01) == [256, 192, 128, 64]  # noise
    # a width timed too fast does not hide the narrower ones: it joins its neighbours' plateau
    assert _fast_side(widths, [4, 4, 3, 3, 1.5, 2, 1, 1], 0.01) == [256, 192, 128, 64]
    # 192 timed at 3 between 5 and 4: pooled with 160 and 128 into one plateau at 4
    assert _fast_side(widths, [8, 7, 3, 5, 4, 3, 2, 1], 0.01) == [256, 224, 192, 96, 64, 32]


def test_fast_side_on_a_gentle_slope_keeps_one_width_per_tolerance_of_cost():
    widths = list(range(14336, 0, -64))
    cost = [w / 14336 for w in widths]  # 0.45% per step near the top: below the 1% tolerance
    kept = _fast_side(widths, cost, 0.01)
    assert kept[0] == 14336 and 40 < len(kept) < len(widths)
    for wider, narrower in zip(kept, kept[1:]):
        assert narrower / wider < 1 / 1.01              # each kept one is >1% cheaper ...
        assert wider - narrower <= 64 * math.ceil(0.01 * wider / 64 + 1)  # ... by about 1%


def test_latency_widths_sit_on_the_fast_side_of_each_step_and_meet_the_budget(tmp_path):
    from prunegraph.passes.allocate import allocate
    from prunegraph.passes.importance import score_groups

    model, groups = _base("llama")
    timer = CountingTimer(step=64)
    table = LatencyTable("cpu", "float32", timer=timer, cache=tmp_path, name="Stepped")
    widths = resolve_widths(groups, model, "latency", latency=table)
    for g in groups:
        if g.kind == "channels":
            # gate/up outputs step at every 64 channels; multiples of 32 in between are as slow
            assert widths.allowed[g.name] == [256, 192, 128, 64]
    meta = widths.latency_meta
    assert meta["gemms_timed"] == timer.calls > 0 and meta["shapes"] == 1  # one shape, 2 layers
    scores = score_groups(model, list(groups), "magnitude")
    for sparsity in (0.1, 0.3, 0.5):
        keep = allocate(groups, scores, sparsity, model=model, round_to=widths)
        assert keep.stats["removed"] >= sparsity * keep.stats["total"]
        for g in groups:
            if g.kind == "channels":
                assert keep[g.name].shape[-1] in (256, 192, 128, 64)
    # the second resolution reads the table (memory, then disk): nothing timed again
    before = timer.calls
    resolve_widths(groups, model, "latency", latency=table)
    assert timer.calls == before


def test_prune_latency_reports_widths_and_latencies_in_the_run_folder(tmp_path, monkeypatch,
                                                                        caplog):
    monkeypatch.setenv("PRUNEGRAPH_CACHE", str(tmp_path / "cache"))
    timer = CountingTimer(step=64)
    monkeypatch.setattr(latency_mod, "default_timer", timer)
    caplog.set_level(logging.INFO, logger="prunegraph")
    state = _state("llama")
    state.run_dir = tmp_path / "run"
    state = Prune(criterion="magnitude", sparsity=0.3, round_to="latency")(state).state
    counts = _channel_counts(state.plan)
    assert all(k % 64 == 0 for k in counts.values())
    report = json.loads((tmp_path / "run" / "widths.json").read_text())["Prune"]
    assert report["round_to"]["requested"] == "latency"
    for row in report["groups"].values():
        tiles = math.ceil(row["kept"] / 64)
        # gate + up ([t, kept] outputs) + down ([t, 64]): tiles x tokens, in microseconds
        assert row["latency_us"] == {"decode": pytest.approx(2 * tiles + 1),
                                     "prefill": pytest.approx(512 * (2 * tiles + 1))}
        assert row["dense_latency_us"]["decode"] == pytest.approx(2 * 4 + 1)
    assert report["latency"]["cache"].startswith(str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "latency").glob("*.json"))
    assert "measured GEMM time decode" in caplog.text
    assert state.metrics["prune"]["widths"]["decode_us"] == pytest.approx(
        sum(r["latency_us"]["decode"] for r in report["groups"].values()))
    _sliced_equals_gated("llama", state.plan)


def test_latency_with_the_real_cpu_timer(tmp_path):
    model, groups = _base("llama")
    table = LatencyTable("cpu", "float32", cache=tmp_path)
    widths = resolve_widths(groups, model, "latency", latency=table)
    mlp = [g for g in groups if g.kind == "channels"]
    for g in mlp:
        row = widths.latency[g.name]
        assert row["widths"][0] == 256 and all(t > 0 for t in row["decode"] + row["prefill"])
        assert widths.allowed[g.name][0] == 256 and set(widths.allowed[g.name]) <= set(
            row["widths"])
    assert table.misses > 0 and table.path.exists()
