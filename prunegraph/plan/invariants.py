"""The equivalence guarantees as pipeline invariant checks (design.md §6).

* ``gates-at-one``: a gated model with every gate at 1 computes what the model computed before
  the gates went on (checked around passes that list it in ``guarantees``, e.g. ``Gate``).
* ``sliced-equals-gated``: the sliced model computes what the model computed gated with the
  plan's gate values (kept units at their scales, removed units at 0), e.g. around ``Slice``.

Both compare logits on a short seeded probe batch, so they cost two forwards of a few tokens.
They run when checks are on (``Pipeline.run(checks=True)``, ``PRUNEGRAPH_CHECKS=1``; the test
suite turns them on) and can be switched on for any run: ``prunegraph run SPEC --checks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from prunegraph.errors import PostconditionError
from prunegraph.pipeline.contract import State
from prunegraph.pipeline.pipeline import Check
from prunegraph.plan.gating import GateSet, apply_gates, gate_shape, remove_gates

__all__ = ["CHECKS", "probe_logits"]

_PROBE_TOKENS = (2, 8)


@torch.no_grad()
def probe_logits(model: nn.Module) -> torch.Tensor | None:
    """Float32 logits of a seeded random batch, or None when the model cannot run (meta)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, _PROBE_TOKENS, generator=gen).to(param.device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids)
    finally:
        model.train(was_training)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _compare(label: str, got: torch.Tensor | None, want: torch.Tensor | None,
             dtype: torch.dtype) -> None:
    if got is None or want is None:
        return
    tol = (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
    diff = float((got - want).abs().max())
    if not diff <= tol:
        raise PostconditionError(f"{label}: logits differ by {diff:.3g} (tolerance {tol:.3g}); "
                                 f"please report this model with the spec that produced it")


def _dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.float32 if param is None else param.dtype


@contextlib.contextmanager
def _gate_values(gates: GateSet, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the installed gates ``values`` (groups not named: 1)."""
    saved = dict(gates.values)
    try:
        for name, group in gates.groups.items():
            value = values.get(name)
            if value is None:
                value = torch.ones(gate_shape(group))
            ref = saved[name]
            gates.values[name] = value.detach().to(device=ref.device, dtype=ref.dtype)
        yield
    finally:
        gates.values.clear()
        gates.values.update(saved)


def _before_gates(state: State) -> torch.Tensor | None:
    return probe_logits(state.model)


def _gates_at_one(state: State, before: torch.Tensor | None) -> None:
    at_one = getattr(state.gates, "at_one", None)  # a handle with its own "all at 1" (LEAP)
    with at_one() if at_one is not None else _gate_values(state.gates, {}):
        after = probe_logits(state.model)
    _compare("with every gate at 1 the gated model differs from the model before gating",
             after, before, _dtype(state.model))


def _before_slice(state: State) -> torch.Tensor | None:
    plan, model = state.plan, state.model
    values = plan.gate_values()
    gates = state.get("gates")
    if isinstance(gates, GateSet):
        with _gate_values(gates, values):
            return probe_logits(model)
    if next(model.parameters()).device.type == "meta":
        return None
    gated = apply_gates(model, [pg.group for pg in plan.groups], values)
    try:
        return probe_logits(model)
    finally:
        remove_gates(gated)


def _sliced_equals_gated(state: State, before: torch.Tensor | None) -> None:
    _compare("the sliced model differs from the model gated with the plan's values",
             probe_logits(state.model), before, _dtype(state.model))


#: The built-in checks; :func:`prunegraph.pipeline.pipeline.registered_checks` includes them.
CHECKS = (
    Check("gates-at-one", ("model", "gates"), _gates_at_one, before=_before_gates, guarantee=True),
    Check("sliced-equals-gated", ("model", "plan"), _sliced_equals_gated, before=_before_slice,
          guarantee=True),
)
