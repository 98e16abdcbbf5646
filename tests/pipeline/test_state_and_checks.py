"""Explicit pipeline state: declared keys and their types, invalidation caught when a pipeline is
built, one spec schema (``Pipeline.to_dict`` loads back as a spec), and the equivalence
guarantees as invariant checks that fail on a broken pass."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml
from _pruning_fixtures import fresh, groups_of

from prunegraph.errors import PassError, PostconditionError, SpecError
from prunegraph.passes import Analyze, Fuse, Prune, Slice
from prunegraph.passes.save import Save
from prunegraph.pipeline import Load, Pass, PassResult, Pipeline, State
from prunegraph.pipeline.contract import declared_keys
from prunegraph.pipeline.spec import Spec, load_spec
from prunegraph.plan.gating import apply_gates
from prunegraph.plan.plan import Plan


def test_slice_then_prune_fails_at_construction_naming_the_invalidation():
    with pytest.raises(SpecError, match=r"pass 3 \(Prune\) requires 'groups', which pass 2 "
                                        r"\(Slice\) invalidated \(slicing changed the model's "
                                        r"shapes\): add `Analyze` between them"):
        Pipeline([Analyze(), Prune(sparsity=0.2), Slice(), Prune(sparsity=0.2)])
    Pipeline([Analyze(), Prune(sparsity=0.2), Slice(), Analyze(), Prune(sparsity=0.2)])


def test_fuse_then_save_fails_at_construction():
    with pytest.raises(SpecError, match=r"\(Save\) requires 'plan', which pass 3 \(Fuse\) "
                                        r"invalidated \(fused modules replace the parameters the "
                                        r"plan names \(Save before Fuse\)\)"):
        Pipeline([Analyze(), Prune(sparsity=0.2), Slice(), Fuse(), Save()])
    Pipeline([Analyze(), Prune(sparsity=0.2), Slice(), Save(), Fuse()])


def test_a_leading_load_needs_no_initial_state():
    pipe = Pipeline([Load(model="random:llama"), Analyze(), Prune(criterion="magnitude",
                                                                   sparsity=0.2), Slice()])
    assert pipe.initial == ()
    state = pipe.run(progress=False)
    assert state.plan.params_removed > 0 and not state.has("groups")  # Slice invalidated them
    assert Pipeline([Analyze()]).initial == ("model", "tokenizer")


def test_to_dict_loads_back_as_a_spec_and_from_yaml():
    pipe = Pipeline([Analyze(), Prune(criterion="magnitude", sparsity=0.3), Slice()])
    data = pipe.to_dict()
    assert Spec.from_dict(data).pipeline == pipe
    assert Pipeline.from_dict(data) == pipe
    assert load_spec(yaml.safe_load(yaml.safe_dump(data))).pipeline == pipe
    with pytest.raises(SpecError, match=r"starts from a state holding model, tokenizer"):
        Spec.from_dict(data).run(progress=False)
    model = fresh("llama")
    state = Spec.from_dict(data).run(state=State(model=model, tokenizer=None), progress=False)
    assert state.plan.params_removed > 0


def test_core_keys_are_declared_with_types():
    keys = declared_keys()
    assert keys["plan"].type == "prunegraph.plan.plan.Plan"
    assert keys["model"].type == "torch.nn.Module"
    assert {"groups", "gates", "tokenizer", "graph", "router"} <= set(keys)


def test_a_pass_that_provides_the_wrong_type_is_a_postcondition_error():
    @dataclass(frozen=True)
    class BadPlan(Pass):
        provides = ("plan",)

        def run(self, state):
            state.plan = {"not": "a plan"}
            return PassResult(state, True)

    with pytest.raises(PostconditionError, match=r"provided 'plan': expected "
                                                 r"prunegraph.plan.plan.Plan, got builtins.dict"):
        BadPlan()(State())


def _plan(arch="llama"):
    groups = groups_of(arch)
    prunable = [g for g in groups if g.prunable and g.kind == "channels"]
    keep = {g.name: list(range(g.size // 2)) for g in prunable}
    return Plan.from_keep(groups, keep, model=fresh(arch))


def test_sliced_equals_gated_check_catches_a_wrong_slice(monkeypatch):
    import prunegraph.passes.slice as slice_mod

    real = slice_mod.apply_plan

    def broken(model, plan, **kw):
        stats = real(model, plan, **kw)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "mlp" in n).mul_(1.5)
        return stats

    state = State(model=fresh("llama"), tokenizer=None, plan=_plan())
    Pipeline([Slice()], initial=("model", "plan")).run(state, progress=False, checks=True)
    monkeypatch.setattr(slice_mod, "apply_plan", broken)
    state = State(model=fresh("llama"), tokenizer=None, plan=_plan())
    with pytest.raises(PassError, match=r"invariant check 'sliced-equals-gated' failed after "
                                        r"pass Slice: .*logits differ") as info:
        Pipeline([Slice()], initial=("model", "plan")).run(state, progress=False, checks=True)
    assert isinstance(info.value.__cause__, PostconditionError)


def test_gates_at_one_check_catches_gates_that_change_the_model():
    groups = list(groups_of("llama"))

    @dataclass(frozen=True)
    class SkewedGate(Pass):
        requires = ("model",)
        provides = ("gates",)
        guarantees = ("gates-at-one",)
        skew: float = 0.0

        def run(self, state):
            state.gates = apply_gates(state.model, groups)
            with torch.no_grad():
                state.model.get_parameter("model.norm.weight").add_(self.skew)
            return PassResult(state, True)

    Pipeline([SkewedGate()]).run(State(model=fresh("llama"), tokenizer=None), progress=False,
                                 checks=True)
    with pytest.raises(PassError, match="'gates-at-one' failed after pass SkewedGate"):
        Pipeline([SkewedGate(skew=0.5)]).run(State(model=fresh("llama"), tokenizer=None),
                                             progress=False, checks=True)
