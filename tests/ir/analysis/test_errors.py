"""Bad input fails early and clearly: untraceable models and ops without a rule."""

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


class _Cumprod(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=-1)


def test_op_without_rule_names_op_node_module_and_fix():
    model = _TinyLM(_Cumprod())
    with pytest.raises(UnsupportedOpError) as e:
        analyze(model, {"input_ids": torch.randint(0, 16, (2, 5))})
    msg = str(e.value)
    assert "aten.cumprod" in msg and "body" in msg and "@rule(" in msg


def test_registered_rule_makes_the_op_supported():
    from prunegraph.ir.analysis import registry

    model = _TinyLM(_Cumprod())
    op = torch.ops.aten.cumprod.default
    try:
        @registry.rule(op)
        def _cumprod(ctx):  # cumulative product along a dim: that dim's units are mixed
            v = ctx.input(0)
            ctx.pin(v.atoms[ctx.arg(1)], "cumulative product over")
            return ctx.input(0)

        a = analyze(model, {"input_ids": torch.randint(0, 16, (2, 5))})
        assert all(g.size != 12 for g in a.prunable())
        sp = a.propagation.spaces
        assert "cumulative product" in sp.pinned(a.propagation.param_atoms["proj.weight"][0])
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

