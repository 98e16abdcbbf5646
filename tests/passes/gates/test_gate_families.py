"""The gate-family registry and typed options: families declared once, options validated like pass
parameters, a new family as one class that Gate, Train and Finalize drive without knowing it,
and `prunegraph passes Gate` listing every family's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from _gate_fixtures import corpus, gated_state, ids, one_thread  # noqa: F401
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer
from torch import nn

from prunegraph.errors import BudgetError, SpecError
from prunegraph.passes.finalize import Finalize
from prunegraph.passes.gates import (
    CONSTRAINT_SCOPES,
    DDPGates,
    DDPOptions,
    GateFamily,
    HardConcreteOptions,
    LagrangianOptions,
    UnitGates,
    describe_families,
    family_class,
    make_family,
    register_family,
    registered_families,
)
from prunegraph.passes.gates.insert import Gate
from prunegraph.passes.gates.registry import isolated_families
from prunegraph.passes.slice import Slice
from prunegraph.passes.train import Train
from prunegraph.pipeline.contract import State


@dataclass(frozen=True)
class SigmoidOptions(LagrangianOptions):
    init: float = 3.0
    stretch: Literal["on", "off"] = "on"

    def validate(self) -> None:
        super().validate()
        if self.init <= 0:
            raise SpecError(f"init must be > 0, got {self.init}")


class SigmoidGates(UnitGates):
    """Stretched-sigmoid gates: a family written for this test, in one class."""

    name = "test_sigmoid"
    options_type = SigmoidOptions
    default_lr = 0.1

    def init_gates(self) -> None:
        self.finalized = 0
        for g in self.groups:
            self.gates[self.key(g.name)] = nn.Parameter(torch.full(self.shapes[g.name],
                                                                   self.options.init))

    def _gate(self, a: torch.Tensor) -> torch.Tensor:
        if self.options.stretch == "off":
            return torch.sigmoid(a)
        return (1.2 * torch.sigmoid(a) - 0.1).clamp(0.0, 1.0)

    def forward_values(self, step, total):
        return {g.name: self._gate(self.tensor(g.name)) for g in self.groups}

    def retention(self, step, total):
        return {g.name: torch.sigmoid(self.tensor(g.name)) for g in self.groups}

    @torch.no_grad()
    def final_values(self):
        return {g.name: self._gate(self.tensor(g.name)).detach().clone() for g in self.groups}

    def finalize(self, values, **kw):
        self.finalized += 1
        return super().finalize(values, **kw)


def test_builtin_families_are_registered_with_their_options():
    families = registered_families()
    assert families["ddp"] is DDPGates and families["ddp"].options_type is DDPOptions
    assert families["hard_concrete"].options_type is HardConcreteOptions
    assert {n: cls.site for n, cls in families.items()} == {
        "ddp": "unit", "hard_concrete": "unit", "leap": "weight"}
    with pytest.raises(SpecError, match="unknown gate family 'ddpp'.*Did you mean 'ddp'"):
        family_class("ddpp")


@pytest.mark.parametrize("options, match", [
    ({"mu_t": 0.1}, "has no option 'mu_t'. Did you mean 'mu_T'"),
    ({"mu_T": "0.05"}, "option 'mu_T' expects float, got str"),
    ({"dual_schedule": "linear"}, "expects 'constant' | 'cosine'"),
    ({"init_std": -1.0}, "init_std must be >= 0"),
    ({"mu0": 0.1, "mu_T": 0.2}, "0 < mu_T <= mu0"),
    ({"lr_l2": -0.1}, "lr_l2 must be >= 0"),
])
def test_bad_options_fail_when_the_pass_is_built(options, match):
    with pytest.raises(SpecError, match=match):
        Gate(family="ddp", options=options)


def test_options_are_typed_and_resolved():
    gate = Gate(family="ddp", options={"mu0": 1, "dual_schedule": "cosine"})
    opts = gate.family_options()
    assert isinstance(opts, DDPOptions)
    assert opts.mu0 == 1.0 and isinstance(opts.mu0, float)      # ints widen, as for pass params
    assert opts.dual_schedule == "cosine" and opts.mu_T == DDPOptions().mu_T
    assert gate.params()["options"] == {"mu0": 1, "dual_schedule": "cosine"}  # the spec as given


def test_typed_options_from_python_become_the_spec_form():
    gate = Gate(family="ddp", options=DDPOptions(mu_T=0.05))
    assert gate.options == DDPOptions(mu_T=0.05).to_dict()
    assert gate.family_options() == DDPOptions(mu_T=0.05)
    assert Gate.from_params(gate.params()) == gate                  # the spec round-trips
    with pytest.raises(SpecError, match="takes DDPOptions, got HardConcreteOptions"):
        Gate(family="ddp", options=HardConcreteOptions())


def test_make_family_takes_options_flat_or_typed():
    groups, model = groups_of("llama"), fresh("llama")
    flat = make_family("ddp", groups, 0.3, model, mu_T=0.05, seed=2)
    typed = make_family("ddp", groups, 0.3, model, options=DDPOptions(mu_T=0.05), seed=2)
    assert flat.options == typed.options == DDPOptions(mu_T=0.05)
    assert all(torch.equal(a, b) for a, b in zip(flat.gates.values(), typed.gates.values()))
    with pytest.raises(SpecError, match="either in options= or flat"):
        make_family("ddp", groups, 0.3, model, options={"mu0": 0.5}, mu_T=0.05)


def test_families_refuse_budget_settings_at_construction():
    with pytest.raises(SpecError, match="budget"):
        Gate(budget="flops")
    with pytest.raises(SpecError, match="scope"):
        Gate(scope="decoder")                 # a parameter scope, not a constraint scope
    with pytest.raises(SpecError, match="constraint scope"):
        DDPGates.check_settings(budget="params", scope="layer", kinds=())
    assert CONSTRAINT_SCOPES == ("global", "group")


def test_parameter_scopes_are_named_apart():
    from prunegraph.passes._param_space import PARAM_SCOPES, param_space

    assert PARAM_SCOPES == ("decoder", "all")
    with pytest.raises(SpecError, match="parameter scope 'global'.*decoder, all"):
        param_space(fresh("llama"), "global")


def test_register_family_checks_the_declaration():
    with isolated_families():
        with pytest.raises(TypeError, match="GateFamily subclass"):
            register_family(object)

        class Nameless(UnitGates):
            pass

        with pytest.raises(TypeError, match="name"):
            register_family(Nameless)

        class BadOptions(UnitGates):
            name = "bad_options"
            options_type = dict                # options must be a FamilyOptions dataclass

        with pytest.raises(TypeError, match="frozen dataclass"):
            register_family(BadOptions)

        class Other(DDPGates):
            name = "ddp"

        with pytest.raises(ValueError, match="already registered"):
            register_family(Other)
    assert registered_families()["ddp"] is DDPGates


def test_a_new_family_is_one_class_that_gate_train_and_finalize_drive(corpus, tmp_path):
    x = ids()
    with torch.no_grad():
        dense = fresh("llama")(x).logits
    with isolated_families():
        register_family(SigmoidGates)
        assert any(line.startswith("test_sigmoid (unit gates") for line in describe_families())
        with pytest.raises(SpecError, match="expects 'on' | 'off'"):
            Gate(family="test_sigmoid", options={"stretch": "maybe"})
        with pytest.raises(SpecError, match="init must be > 0"):
            Gate(family="test_sigmoid", options={"init": 0.0})
        state = State(model=fresh("llama"), tokenizer=make_tokenizer(),
                      groups=list(groups_of("llama")), run_dir=tmp_path)
        state = Gate(family="test_sigmoid", sparsity=0.3, options={"init": 3.0})(state).state
        family = state.gate_family
        assert isinstance(family, SigmoidGates) and family.lr == 0.1       # its default lr
        with torch.no_grad():
            assert torch.equal(state.model(x).logits, dense)                 # gates at 1
        Train(steps=6, polish_steps=2, batch_size=2, block_len=32, warmup=1, source=corpus,
              plots=False)(state)
        assert family.finalized == 1                                         # the polish asked it
        assert not (tmp_path / "train" / "loss.png").exists()
        result = Finalize()(state)
        assert family.finalized == 2
        assert state.plan.report["params_removed"] == result.stats["params_removed"] > 0
        with torch.no_grad():
            gated = state.model(x).logits
        Slice()(state)
        with torch.no_grad():
            torch.testing.assert_close(state.model(x).logits, gated, atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match="unknown gate family"):
        Gate(family="test_sigmoid")                                          # forgotten on exit


def test_finalize_asks_the_family_for_its_plan(corpus):
    state = gated_state("llama", sparsity=0.3, lr=0.1)
    Train(steps=4, batch_size=2, block_len=32, warmup=1, source=corpus, plots=False)(state)
    values = {n: v.detach().float().cpu() for n, v in state.trained_gates.items()}
    want = state.gate_family.finalize(values, mode="topk", model=state.model)
    Finalize()(state)
    assert {pg.name: pg.keep.tolist() for pg in state.plan.groups} == {
        pg.name: pg.keep.tolist() for pg in want.groups}
    with pytest.raises(SpecError, match="finalize mode"):
        state.gate_family.keep(values, "bottomk")


def test_gate_family_interface_is_abstract():
    family = GateFamily(groups_of("llama"), 0.2)
    for call in (lambda: family.install(fresh("llama")), family.final_values,
                 lambda: family.finalize({})):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(BudgetError):
        GateFamily(groups_of("llama"), 1.5)


def test_prunegraph_passes_lists_families_and_their_options(capsys):
    from prunegraph.cli.main import main

    assert main(["passes", "Gate"]) == 0
    out = capsys.readouterr().out
    assert "ddp (unit gates, lr 0.02)" in out and "hard_concrete (unit gates, lr 0.1)" in out
    assert "mu_T: float = 0.1" in out and "temperature: float = " in out
    assert "dual_schedule: 'constant' | 'cosine' = 'constant'" in out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "family is one of ddp, hard_concrete" in out
