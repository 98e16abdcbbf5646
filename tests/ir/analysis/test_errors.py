"""Bad input fails early and clearly: untraceable models; ops without a rule are pinned with one
warning (or, in strict mode, an error that says how to register a rule)."""

from __future__ import annotations

import pytest
import torch

from prunegraph.errors import CaptureError, UnsupportedOpError
from prunegraph.ir.analysis import analyze


class _TinyLM(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 12)
        self.body = body
        self.head = torch.nn.Linear(12, 16)

    def forward(self, input_ids):
        return self.head(self.body(self.proj(self.embed(input_ids))))


@torch.library.custom_op("prunegraph_test::reverse", mutates_args=())
def _reverse(x: torch.Tensor) -> torch.Tensor:
    """An op nobody wrote a dimension rule for: it reverses (mixes) the last dim."""
    return x.flip(-1)


@_reverse.register_fake
def _(x):
    return torch.empty_like(x)


class _Reverse(torch.nn.Module):
    def forward(self, x):
        return torch.ops.prunegraph_test.reverse(x)


def _ids():
    return {"input_ids": torch.randint(0, 16, (2, 5))}


def test_op_without_rule_is_pinned_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger="prunegraph"):
        a = analyze(_TinyLM(_Reverse()), _ids())
    warnings = [r for r in caplog.records if "no dimension rule" in r.getMessage()]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "prunegraph_test.reverse" in msg and "@rule(" in msg and "strict=True" in msg
    # the op's spaces are pinned (never guessed), the rest of the model stays analysable
    assert all(g.size != 12 for g in a.prunable())
    assert a.fallback_pins() == {"prunegraph_test.reverse.default": ["head.weight", "proj.bias",
                                                                     "proj.weight"]}
    assert list(a.propagation.fallback) == ["prunegraph_test.reverse.default"]
    # inspect's table says how much stayed prunable and which op pinned what
    from prunegraph.ir.analysis.report import summary, table

    text = table(a)
    assert "prunegraph_test.reverse.default (1 node): pins head.weight, proj.bias, proj.weight" in text
    assert f"({100 * summary(a)['prunable_share']:.1f}%)" in text


def test_strict_mode_names_op_node_module_and_fix():
    with pytest.raises(UnsupportedOpError) as e:
        analyze(_TinyLM(_Reverse()), _ids(), strict=True)
    msg = str(e.value)
    assert "prunegraph_test.reverse" in msg and "body" in msg and "@rule(" in msg


def test_registered_rule_makes_the_op_supported():
    from prunegraph.ir.analysis import registry

    op = torch.ops.prunegraph_test.reverse.default
    try:
        @registry.rule(op)
        def _reverse_rule(ctx):  # the reversed dim's units change places: pinned, others pass
            v = ctx.input(0)
            ctx.pin(v.atoms[-1], "reversed")
            return ctx.input(0)

        a = analyze(_TinyLM(_Reverse()), _ids(), strict=True)
        assert all(g.size != 12 for g in a.prunable())
        sp = a.propagation.spaces
        assert "reversed" in sp.pinned(a.propagation.param_atoms["proj.weight"][0])
        assert not a.propagation.fallback
        (hidden,) = [g for g in a.groups if g.size == 8]
        assert hidden.kind == "hidden" and hidden.prunable  # no norm here: hidden is free
    finally:
        registry._RULES.pop(op, None)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, input_ids):
        x = self.lin(input_ids.float().unsqueeze(-1).expand(-1, -1, 4))
        if x.sum() > 0:  # data-dependent control flow cannot be exported
            return x
        return -x


def test_untraceable_model_names_class_and_construct():
    with pytest.raises(CaptureError) as e:
        analyze(_DataDependent(), {"input_ids": torch.randint(0, 16, (2, 5))})
    assert "_DataDependent" in str(e.value)


class _LengthGuarded(torch.nn.Module):
    """Branches on the sequence length: a guard no named range up to 2**17 satisfies."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if input_ids.shape[1] > 64:
            x = x * 2
        return self.head(x)


def test_guarded_sequence_length_falls_back_to_automatic_dims(caplog):
    from prunegraph.ir.capture import capture

    with caplog.at_level("WARNING", logger="prunegraph"):
        graph = capture(_LengthGuarded(), {"input_ids": torch.randint(0, 16, (2, 5))})
    assert "retrying with automatic dynamic dims" in caplog.text
    assert graph.param_names  # a usable graph: parameters mapped to their names
    assert analyze(_LengthGuarded(), {"input_ids": torch.randint(0, 16, (2, 5))}).groups

