"""PrunePath routing: equal to the Triton module's PyTorch reference, τ semantics, statistics,
training stages through the Train loop (exact resume included), save → reload, and errors
before work."""

from __future__ import annotations

import json

import pytest
import torch
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import prunegraph
from prunegraph.errors import PrunegraphError, SpecError
from prunegraph.passes.prunepath import router as pp
from prunegraph.passes.prunepath.moefy import MoEfy
from prunegraph.passes.prunepath.training import PrunePath, PrunePathObjective, TauSweep, sweep
from prunegraph.passes.train import TrainConfig, TrainingHalted, fit
from prunegraph.pipeline.contract import State
from prunegraph.targets.triton.prunepath import prunepath_ffn_reference, prunepath_gates


def _routed(arch: str, group_size: int = 12, tau: float = 0.6, mode: str = "exclusive",
            seed: int = 0):
    """A MoEfied tiny model with routers installed and given random weights."""
    model = fresh(arch)
    state = MoEfy(group_size=group_size, iters=5)(State(model=model,
                                                        groups=list(groups_of(arch)))).state
    state = PrunePath(warmup_steps=0, train=dict(steps=0), tau=tau, mode=mode)(state).state
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in pp.routers(model):
            r.weight.copy_(torch.randn(r.weight.shape, generator=gen))
    return model, state


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 200, (2, 10), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(e=st.integers(1, 12), t=st.integers(1, 5), tau=st.floats(0.01, 1.5),
       mode=st.sampled_from(pp.MODES), seed=st.integers(0, 1000))
def test_gates_equal_the_kernel_reference(e, t, tau, mode, seed):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 3
    gates, keep = pp.topp_gates(logits, tau, mode)
    assert torch.equal(gates, prunepath_gates(logits, tau, mode))
    assert keep.any(-1).all()  # top-1 always kept
    top = logits.argmax(-1)
    assert keep[torch.arange(t), top].all()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("mode", pp.MODES)
@pytest.mark.parametrize("tau", [0.3, 0.7, 1.2])
def test_mlp_equals_prunepath_ffn_reference(arch, mode, tau):
    model, state = _routed(arch, tau=tau, mode=mode)
    entry = state.moe_layout[0]
    mlp = model.get_submodule(entry["router"].rpartition(".")[0])
    router = pp.routers(model)[0]
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    if hasattr(mlp, "gate_up_proj"):
        wg, wu = mlp.gate_up_proj.weight.chunk(2, dim=0)
    else:
        wg, wu = mlp.gate_proj.weight, mlp.up_proj.weight
    with torch.no_grad():
        got = mlp(x)
        want = prunepath_ffn_reference(x, router.weight, wg, wu, mlp.down_proj.weight, tau,
                                       entry["group_size"], mode)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_tau_above_one_keeps_every_expert_and_fraction_grows_with_tau():
    model, _ = _routed("llama")
    fractions = []
    for tau in (0.2, 0.5, 0.8, 0.99, 1.01):
        pp.set_tau(model, tau)
        pp.reset_stats(model)
        with torch.no_grad():
            model(input_ids=_ids())
        fractions.append(pp.active_fraction(model))
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and fractions[0] < 1.0
    # at tau > 1 the output is the dense MLP with every channel scaled by sigmoid(r_e)
    pp.set_tau(model, 1.01)
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, model.config.hidden_size)
    with torch.no_grad():
        r = mlp.prunepath_router
        scale = torch.sigmoid(x @ r.weight.T).repeat_interleave(r.group_size, dim=-1)
        lin = torch.nn.functional.linear
        h = torch.nn.functional.silu(lin(x, mlp.gate_proj.weight)) * lin(x, mlp.up_proj.weight)
        assert torch.allclose(mlp(x), lin(h * scale, mlp.down_proj.weight), atol=1e-6)


def test_inclusive_touches_at_least_as_much_as_exclusive():
    model, _ = _routed("qwen3", tau=0.6, mode="exclusive")
    with torch.no_grad():
        model(input_ids=_ids())
    excl = pp.active_fraction(model)
    pp.set_mode(model, "inclusive")
    pp.reset_stats(model)
    with torch.no_grad():
        model(input_ids=_ids())
    assert pp.active_fraction(model) > excl


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_reload_same_outputs_and_tau_changeable(arch, tmp_path):
    model, state = _routed(arch, group_size=32 if arch == "gpt2" else 12, tau=0.6)
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    prunegraph.save_pruned(model, state.plan, tmp_path / "m")
    loaded = prunegraph.from_pretrained(tmp_path / "m")
    assert pp.get_tau(loaded) == 0.6
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, ref)
    pp.set_tau(loaded, 1.5)
    pp.reset_stats(loaded)
    with torch.no_grad():
        dense = loaded(input_ids=_ids()).logits
    assert pp.active_fraction(loaded) == 1.0
    assert not torch.allclose(dense, ref)
    pp.set_tau(model, 1.5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, dense)


@pytest.mark.slow
def test_training_moves_router_and_ffn_with_their_own_learning_rates(tmp_path):
    model = fresh("llama")
    state = State(model=model, groups=list(groups_of("llama")), tokenizer=make_tokenizer())
    state = MoEfy(group_size=12, iters=5)(state).state
    ffn_before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    attn_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = PrunePath(warmup_steps=2, train=dict(steps=4, batch_size=2, block_len=16), lr=0.0,
                       router_lr=1e-2, tau=0.8)(state)
    routers = pp.routers(model)
    assert all(r.weight.abs().sum() > 0 for r in routers)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, ffn_before)  # lr=0
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, attn_before)
    stages = result.state.metrics["prunepath"]["stages"]
    assert [s["stage"] for s in stages] == ["warmup", "sparse"]
    assert stages[0]["active_fraction"] == 1.0 and stages[1]["active_fraction"] < 1.0
    assert pp.get_tau(model) == 0.8
    assert all(p.requires_grad for p in model.parameters())

    model2 = fresh("llama")
    state2 = MoEfy(group_size=12, iters=5)(State(model=model2, groups=list(groups_of("llama")),
                                                 tokenizer=make_tokenizer())).state
    PrunePath(warmup_steps=1, train=dict(steps=2, batch_size=2, block_len=16), lr=1e-3,
              router_lr=0.0, router_decay=0.0, router_init="zero")(state2)
    assert all(r.weight.abs().sum() == 0 for r in pp.routers(model2))
    assert not torch.equal(model2.model.layers[0].mlp.up_proj.weight,
                           fresh("llama").model.layers[0].mlp.up_proj.weight)


def _moefied(arch: str = "llama") -> State:
    """A MoEfied tiny model with a tokenizer, ready for PrunePath training."""
    state = State(model=fresh(arch), groups=list(groups_of(arch)), tokenizer=make_tokenizer())
    return MoEfy(group_size=12, iters=5)(state).state


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_uninterrupted_weights(tmp_path):
    train = dict(steps=5, batch_size=2, block_len=16, grad_accum=2, checkpoint_every=2)
    kw = dict(warmup_steps=2, lr=1e-3, router_lr=1e-2, train=train)
    full = _moefied()
    full.run_dir = tmp_path / "a"
    PrunePath(**kw)(full)
    first = _moefied()
    first.run_dir = tmp_path / "b"
    with pytest.raises(TrainingHalted, match="resume"):
        PrunePath(**{**kw, "train": {**train, "halt_after": 3}})(first)  # inside the sparse stage
    again = _moefied()                                     # a fresh process: new model, routers
    again.run_dir = tmp_path / "b"
    PrunePath(**kw)(again)
    assert again.metrics["prunepath"]["resumed_at"] == 3
    want = dict(full.model.named_parameters())
    for name, value in again.model.named_parameters():
        assert torch.equal(value, want[name]), name
    assert again.metrics["prunepath"]["stages"] == full.metrics["prunepath"]["stages"]
    a = (tmp_path / "a" / "prunepath" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "prunepath" / "metrics.jsonl").read_text()
    taus = [json.loads(line)["tau"] for line in a.splitlines()]
    assert taus == [1.05, 1.05, 0.5, 0.5, 0.5]            # τ switches at warmup_steps
    # the checkpoint (weights + AdamW moments) let run b resume; it goes once training ends
    for run in ("a", "b"):
        assert not (tmp_path / run / "prunepath" / "checkpoint.pt").exists()
    kept = _moefied()
    kept.run_dir = tmp_path / "c"
    PrunePath(**{**kw, "train": {**train, "keep_checkpoint": True}})(kept)
    assert (tmp_path / "c" / "prunepath" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_router_scope_trains_only_the_routers_and_keeps_the_flags():
    state = _moefied()
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    state.model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    PrunePath(warmup_steps=1, train=dict(steps=2, batch_size=2, block_len=16), lr=1e-2,
              train_scope="router")(state)
    routers = pp.router_param_names(state.model)
    for name, p in state.model.named_parameters():
        assert (name in routers) or torch.equal(p, before[name]), name
        assert p.requires_grad == (name != "model.layers.0.mlp.up_proj.weight")
    assert all(r.weight.abs().sum() > 0 for r in pp.routers(state.model))


def test_prunepath_objective_has_no_teacher():
    state = _moefied()
    pp.install(state.model, state.moe_layout)
    objective = PrunePathObjective(state.model, PrunePath())
    objective.kd_weight = 1.0
    with pytest.raises(SpecError, match="no teacher.*kd_weight=0"):
        fit(state, objective, TrainConfig(steps=1))


def test_tau_sweep_records_points():
    model, state = _routed("llama")
    state.tokenizer = make_tokenizer()
    res = TauSweep(taus=[0.3, 0.9], ppl_blocks=2, seq_len=16)(state)
    rows = res.state.metrics["sweep"]
    assert [r["tau"] for r in rows] == [0.3, 0.9]
    assert rows[0]["active_fraction"] < rows[1]["active_fraction"] <= 1.0
    assert all(r["ppl"] > 1 for r in rows)
    assert pp.get_tau(model) == 0.6  # restored


def test_tau_sweep_on_a_loaded_checkpoint(tmp_path):
    """One saved checkpoint, swept later through the ordinary loader (`model: DIR`): Load puts
    the folder's plan and routers in the state, which TauSweep requires."""
    from prunegraph.errors import PreconditionError
    from prunegraph.pipeline.load import Load

    model, state = _routed("llama", tau=0.6)
    prunegraph.save_pruned(model, state.plan, tmp_path / "m", tokenizer=make_tokenizer())
    loaded = Load(model=str(tmp_path / "m"), device="cpu")(State()).state
    assert loaded.router["layers"] and loaded.plan.fingerprint == state.plan.fingerprint
    rows = TauSweep(taus=[0.5, 2.0], ppl_blocks=1, seq_len=16)(loaded).state.metrics["sweep"]
    assert rows[1]["active_fraction"] == 1.0 > rows[0]["active_fraction"]
    with pytest.raises(PreconditionError, match="requires 'router'.*PrunePath"):
        TauSweep(taus=[0.5], ppl_blocks=1, seq_len=16)(
            State(model=fresh("llama"), tokenizer=loaded.tokenizer))


def test_bad_input_errors_before_work():
    with pytest.raises(SpecError, match="tau must be a number > 0"):
        PrunePath(tau=0)
    with pytest.raises(SpecError, match="train_tau"):
        PrunePath(train_tau=-0.5)
    with pytest.raises(SpecError, match="taus is empty"):
        TauSweep(taus=[])
    with pytest.raises(SpecError, match="mode"):
        PrunePath(mode="nucleus")
    with pytest.raises(SpecError, match="grad_accum"):
        PrunePath(train=dict(grad_accum=0))
    with pytest.raises(SpecError, match="halt_after"):
        PrunePath(train=dict(halt_after=0))
    with pytest.raises(SpecError, match="train_tau_max"):
        PrunePath(train_tau=0.6, train_tau_max=0.5)
    model, _ = _routed("llama")
    before = pp.get_tau(model)
    with pytest.raises(SpecError, match="tau must be a number > 0"):
        pp.set_tau(model, 0.0)
    assert pp.get_tau(model) == before
    with pytest.raises(PrunegraphError, match="already installed"):
        pp.install(model, model._prunepath["layers"])
    with pytest.raises(PrunegraphError, match="no PrunePath routers"):
        pp.set_tau(fresh("llama"), 0.5)
    plain = fresh("llama")
    names = {n for n, _ in plain.named_parameters()}
    with pytest.raises(PrunegraphError, match="no module"):
        pp.install(plain, [{"router": "x.prunepath_router", "producer": "nope", "consumer": "x",
                            "width": 96, "group_size": 12}])
    assert {n for n, _ in plain.named_parameters()} == names
    with pytest.raises(PrunegraphError):
        sweep(plain, torch.zeros(1, 4, dtype=torch.long), [0.5])


def test_remove_restores_the_dense_permuted_model():
    model, _ = _routed("llama")
    pp.remove(model)
    assert not pp.is_installed(model)
    assert not any("prunepath" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_sparse_stage_tau_range_is_sampled_per_step_and_reproducible(tmp_path):
    kw = dict(warmup_steps=1, train=dict(steps=7, batch_size=2, block_len=16), train_tau=0.5,
              train_tau_max=0.9)
    runs = []
    for name in ("a", "b"):
        state = _moefied()
        state.run_dir = tmp_path / name
        PrunePath(**kw)(state)
        lines = (tmp_path / name / "prunepath" / "metrics.jsonl").read_text().splitlines()
        runs.append([json.loads(line)["tau"] for line in lines])
    taus = runs[0]
    assert taus[0] == 1.05 and all(0.5 <= t <= 0.9 for t in taus[1:])
    assert len(set(taus[1:])) == 6                      # a new τ every sparse step
    assert runs[0] == runs[1]                           # seeded by step: resumes the same
    lo, hi = state.metrics["prunepath"]["stages"][1]["tau"]  # the stage reports its range
    assert (lo, hi) == (round(min(taus[1:]), 4), round(max(taus[1:]), 4))

