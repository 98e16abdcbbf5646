"""The pass contract: State, parameter checking, the checked call, the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prunegraph.pipeline.pipeline  # noqa: F401  (registers Load)
from prunegraph.errors import (
    BudgetError,
    PassError,
    PostconditionError,
    PreconditionError,
    SpecError,
)
from prunegraph.pipeline.contract import (
    Pass,
    PassResult,
    State,
    coerce_param,
    get_pass_class,
    isolated_registry,
    progress_bar,
    register_pass,
    registered_passes,
    type_name,
)


@dataclass(frozen=True)
class Analyze(Pass):
    """Finds groups (dummy)."""

    requires = ("model",)
    provides = ("groups",)

    def run(self, state: State) -> PassResult:
        state.groups = ["g0", "g1"]
        return PassResult(state, modified=True, stats={"groups": 2})


@dataclass(frozen=True)
class Prune(Pass):
    """Prunes (dummy) with typed parameters."""

    requires = ("model", "groups")
    provides = ("plan",)

    sparsity: float = 0.5
    criterion: Literal["magnitude", "wanda"] = "magnitude"
    layers: tuple[int, ...] = ()
    round_to: int | None = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise SpecError(f"sparsity must be in (0, 1), got {self.sparsity}")

    def run(self, state: State) -> PassResult:
        state.plan = {g: self.sparsity for g in state.groups}
        return PassResult(state, modified=True, stats={"planned": len(state.groups)})


@dataclass(frozen=True)
class Behave(Pass):
    """Misbehaves on demand, to exercise the checks of Pass.__call__."""

    provides = ("out",)
    mode: str = "ok"

    def run(self, state: State) -> Any:
        if self.mode == "raise":
            raise ZeroDivisionError("boom")
        if self.mode == "budget":
            raise BudgetError("budget impossible")
        if self.mode == "wrong-type":
            return state
        if self.mode == "no-provide":
            return PassResult(state, modified=False)
        if self.mode == "bad-state":
            return PassResult({"out": 1}, modified=True)  # type: ignore[arg-type]
        state.out = 1
        return PassResult(state, modified=True)


@pytest.fixture
def registry():
    with isolated_registry(empty=True):
        for cls in (Analyze, Prune, Behave):
            register_pass(cls)
        yield


# ---------------------------------------------------------------------------------- State


def test_state_attributes_and_has():
    s = State(model="m")
    assert s.model == "m" and s.has("model") and "model" in s
    assert not s.has("groups")
    s.groups = [1]
    assert s.keys() == ["model", "groups"]
    del s.groups
    assert not s.has("groups")


def test_state_missing_key_names_it_and_suggests():
    s = State(model="m", groups=[])
    with pytest.raises(PreconditionError, match=r"state has no 'group'.*Did you mean 'groups'"):
        s.group  # noqa: B018
    assert not hasattr(s, "plan") and getattr(s, "plan", 7) == 7


def test_state_ambient_keys_always_present():
    s = State()
    assert s.metrics == {} and s.run_dir is None and s.progress is False
    assert s.log.name == "prunegraph.pipeline"
    assert s.keys() == []
    s.run_dir = "runs/x"
    assert str(s.run_dir) == "runs/x" and s.run_dir.__class__.__name__.endswith("Path")
    with pytest.raises(AttributeError):
        del s.metrics
    with pytest.raises(TypeError):
        s.metrics = []


def test_state_methods_cannot_be_shadowed():
    with pytest.raises(AttributeError, match="'keys' is a State method"):
        State(keys=[1])


def test_progress_bar_follows_state(capsys):
    quiet, loud = State(), State(progress=True)
    assert list(progress_bar(quiet, range(3), desc="q")) == [0, 1, 2]
    assert list(progress_bar(loud, range(3), desc="loud")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "loud" in err and "q:" not in err


def test_states_do_not_share_metrics():
    a, b = State(), State()
    a.metrics["x"] = 1
    assert b.metrics == {}


# ----------------------------------------------------------------------------- parameters


def test_defaults_and_coercion(registry):
    p = Prune(sparsity=1 / 4, layers=[1, 2], extra={"a": 1})
    assert p.layers == (1, 2) and isinstance(p.layers, tuple)
    assert p.extra == {"a": 1.0} and isinstance(p.extra["a"], float)
    q = Prune(sparsity=0.5)
    assert q == Prune() and q.criterion == "magnitude" and q.round_to is None
    assert Prune(round_to=8).round_to == 8


def test_int_widens_to_float_so_specs_compare_equal():
    @dataclass(frozen=True)
    class Scale(Pass):
        factor: float = 1.0

        def run(self, state):
            return PassResult(state, False)

    s = Scale(factor=2)
    assert s == Scale(factor=2.0) and type(s.factor) is float
    assert s.to_dict() == {"Scale": {"factor": 2.0}}


@pytest.mark.parametrize(
    ("kwargs", "expected", "got"),
    [
        ({"sparsity": "0.3"}, "float", "str '0.3'"),
        ({"sparsity": True}, "float", "bool True"),
        ({"criterion": "l2"}, "'magnitude' | 'wanda'", "str 'l2'"),
        ({"layers": 3}, r"tuple\[int, \.\.\.\]", "int 3"),
        ({"layers": [1, "a"]}, r"tuple\[int, \.\.\.\]", r"list \[1, 'a'\]"),
        ({"round_to": 8.5}, "int | None", "float 8.5"),
        ({"round_to": [8]}, "int | None", r"list \[8\]"),
    ],
)
def test_type_errors_name_pass_param_type_and_value(registry, kwargs, expected, got):
    (param,) = kwargs
    with pytest.raises(SpecError, match=rf"pass Prune: parameter '{param}' expects {expected}, "
                                        rf"got {got}"):
        Prune(**kwargs)


def test_validate_hook_runs_at_construction(registry):
    with pytest.raises(SpecError, match=r"sparsity must be in \(0, 1\), got 1.5"):
        Prune(sparsity=1.5)


def test_passes_are_frozen(registry):
    p = Prune()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sparsity = 0.1  # type: ignore[misc]


def test_from_params_unknown_and_missing(registry):
    with pytest.raises(SpecError, match=r"no parameter 'sparsty'. Did you mean 'sparsity'\?"):
        Prune.from_params({"sparsty": 0.2}, where="x.yaml: passes[1]")

    @dataclass(frozen=True)
    class Needs(Pass):
        target: str

        def run(self, state):
            return PassResult(state, False)

    with pytest.raises(SpecError, match=r"needs parameter 'target' \(str\)"):
        Needs.from_params({})
    with pytest.raises(SpecError, match="must be a mapping"):
        Prune.from_params([0.2])  # type: ignore[arg-type]


def test_to_dict_resolves_every_default(registry):
    assert Prune(layers=(3,)).to_dict() == {"Prune": {
        "sparsity": 0.5, "criterion": "magnitude", "layers": [3], "round_to": None, "extra": {}}}


def test_type_name():
    assert type_name(int | None) == "int | None"
    assert type_name(tuple[int, str]) == "tuple[int, str]"
    assert type_name(Literal["a", 1]) == "'a' | 1"


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=5))


@settings(deadline=None)
@given(_SCALARS)
def test_coerce_scalars_property(value):
    """Exactly the values of a type are accepted; ints alone widen to float; bools never count."""
    for tp in (int, float, str, bool, type(None)):
        try:
            out = coerce_param(value, tp)
        except TypeError:
            ok = False
        else:
            ok = True
            assert isinstance(out, tp)
        is_bool = isinstance(value, bool)
        expect = {
            int: isinstance(value, int) and not is_bool,
            float: isinstance(value, (int, float)) and not is_bool,
            str: isinstance(value, str),
            bool: is_bool,
            type(None): value is None,
        }[tp]
        assert ok == expect, (value, tp)


@settings(deadline=None)
@given(st.lists(st.integers(), max_size=5))
def test_coerce_tuple_of_int_property(values):
    assert coerce_param(values, tuple[int, ...]) == tuple(values)
    if values:
        with pytest.raises(TypeError):
            coerce_param([*values, "x"], tuple[int, ...])


# -------------------------------------------------------------------------- checked call


def test_call_checks_preconditions_with_providers(registry):
    with pytest.raises(PreconditionError,
                       match=r"pass Prune requires 'groups'.*Passes that provide 'groups': "
                             r"Analyze"):
        Prune()(State(model="m"))


def test_call_runs_and_returns_result(registry):
    r = Analyze()(State(model="m"))
    assert r.modified is True and r.stats == {"groups": 2} and r.state.groups == ["g0", "g1"]
    r2 = Prune(sparsity=0.25)(r.state)
    assert r2.state.plan == {"g0": 0.25, "g1": 0.25}


def test_foreign_exception_becomes_pass_error_from_cause(registry):
    with pytest.raises(PassError, match="pass Behave failed: ZeroDivisionError: boom") as info:
        Behave(mode="raise")(State())
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_prunegraph_errors_pass_through_unwrapped(registry):
    with pytest.raises(BudgetError, match="budget impossible"):
        Behave(mode="budget")(State())


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("wrong-type", r"Behave.run returned State, expected PassResult"),
        ("no-provide", r"promised to provide 'out'"),
        ("bad-state", r"state is dict, expected State"),
    ],
)
def test_postconditions(registry, mode, message):
    with pytest.raises(PostconditionError, match=message):
        Behave(mode=mode)(State())


def test_call_rejects_non_state(registry):
    with pytest.raises(TypeError, match="expects a State"):
        Analyze()({"model": 1})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ registry


def test_registry_lookup_and_nearest(registry):
    assert get_pass_class("Prune") is Prune
    with pytest.raises(SpecError, match=r"unknown pass 'Prun'. Did you mean 'Prune'\?"):
        get_pass_class("Prun")
    with pytest.raises(SpecError, match=r"Registered passes: .*Analyze"):
        get_pass_class("Zzzzzz")


def test_a_name_offered_from_two_lists_is_suggested_once():
    """``--set Gaet.lr=1`` looks among the spec's passes and the registered ones: Gate is in
    both, and the hint names it once."""
    from prunegraph.errors import nearest

    assert nearest("Gaet", ["Gate", "Train", "Gate"]) == " Did you mean 'Gate'?"


def test_registry_is_isolated():
    before = registered_passes()
    assert "Load" in before  # the built-in pass is registered on import of the pipeline
    with isolated_registry(empty=True):
        assert registered_passes() == {}
        register_pass(Prune)
        assert registered_passes() == {"Prune": Prune}
    assert registered_passes() == before

    @dataclass(frozen=True)
    class IsolationProbe(Pass):
        def run(self, state):
            return PassResult(state, False)

    with isolated_registry():
        register_pass(IsolationProbe)
        assert registered_passes() == {**before, "IsolationProbe": IsolationProbe}
    assert registered_passes() == before


def test_register_requires_frozen_dataclass():
    with isolated_registry(empty=True):
        class Plain(Pass):
            pass

        with pytest.raises(TypeError, match=r"@dataclass\(frozen=True\)"):
            register_pass(Plain)

        @dataclass
        class Thawed(Pass):
            x: int = 0

        with pytest.raises(TypeError, match="must be frozen"):
            register_pass(Thawed)

        @dataclass(frozen=True)
        class BadRequires(Pass):
            requires = "model"  # type: ignore[assignment]

        with pytest.raises(TypeError, match="requires must be a tuple of str"):
            register_pass(BadRequires)


def test_register_name_defaults_to_class_name_and_conflicts_are_refused():
    with isolated_registry(empty=True):
        @dataclass(frozen=True)
        class Other(Pass):
            name = "Prune"

        register_pass(Prune)
        assert Prune.pass_name() == "Prune"
        with pytest.raises(ValueError, match="already registered"):
            register_pass(Other)
        register_pass(Prune)  # re-registering the same class is harmless
