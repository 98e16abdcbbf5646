"""Kept widths the hardware runs at full speed: the ``round_to`` rule table and its resolution.

Every pass that chooses kept counts (``Prune``, ``Finalize``, ``Train``'s polish) takes a
``round_to``:

* ``auto`` (the default): kept counts of channel groups are multiples of what :data:`WIDTH_RULES`
  gives for the device and dtype the model runs on (the device and dtype of its parameters; a
  ``meta`` model is taken to run on this machine's default device);
* ``latency``: ``auto``'s multiples, then only the widths on the fast side of each latency step
  measured on the device (:mod:`prunegraph.plan.latency`);
* an integer: multiples of it, whatever the device (``1``: exact widths).

Heads are never rounded (a head is already ``head_dim`` wide) and nor are experts (whole
expert counts); per-expert channels are. How a resolved multiple becomes each group's allowed
kept counts, and what happens when a group is too small for it, is
:mod:`prunegraph.passes._widths`.

The table is the one place where hardware knowledge about widths lives; each row says where its
number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunegraph.errors import SpecError

__all__ = ["ROUND_TO_MODES", "WIDTH_RULES", "WidthRule", "RoundTo", "check_round_to",
           "resolve_round_to", "runs_on"]

#: The named ``round_to`` values (an integer is the other kind).
ROUND_TO_MODES = ("auto", "latency")


@dataclass(frozen=True)
class WidthRule:
    """Kept counts on ``device`` (a torch device type, ``""``: any) for ``dtypes`` (``()``: any)
    are multiples of ``multiple``; ``source`` is the measurement (or assumption) behind it."""

    device: str
    dtypes: tuple[str, ...]
    multiple: int
    source: str

    def matches(self, device: str, dtype: str) -> bool:
        return self.device in ("", device) and (not self.dtypes or dtype in self.dtypes)


#: First matching row wins.
WIDTH_RULES: tuple[WidthRule, ...] = (
    WidthRule("cuda", ("bfloat16", "float16"), 64,
              "measured on an H200, bf16 (docs/benchmarks.md, 'End-to-end speed of pruned models "
              "on the GPU', benchmarks/results/gpu_speed_h200.json): exact widths run prefill at "
              "0.43-0.61x dense, multiples of 64 reach 90-93% of the ideal at 20% removed"),
    WidthRule("cuda", (), 64,
              "assumed from the bf16 measurement: float32 (TF32) GEMMs use the same tile widths; "
              "not measured"),
    WidthRule("cpu", (), 32,
              "measured on x86_64, float32, 1 thread (docs/benchmarks.md, 'End-to-end speed of "
              "pruned models on the CPU', benchmarks/results/cpu_speed.json): multiples of 32-128 "
              "run 3.5-5% faster per channel at 512 tokens, 32 is the smallest within 2% of the "
              "best; odd widths are not measurably slower"),
    WidthRule("", (), 64,
              "assumed for other accelerators (mps, xpu, ...): the GPU rule; not measured"),
)


@dataclass(frozen=True)
class RoundTo:
    """A resolved ``round_to``: what was asked, the multiple it means, and why.

    Attributes:
        requested: ``"auto"``, ``"latency"`` or the integer given.
        multiple: kept counts of channel groups are multiples of this.
        device, dtype: what the model runs on (torch device type, dtype name).
        source: the rule's source, or ``"given"`` for an integer.
    """

    requested: int | str
    multiple: int
    device: str
    dtype: str
    source: str

    @property
    def explicit(self) -> bool:
        """An integer given by the user (a rounding no group can honour is then an error)."""
        return not isinstance(self.requested, str)

    @property
    def latency(self) -> bool:
        return self.requested == "latency"

    def __str__(self) -> str:
        if self.explicit:
            return str(self.requested)
        return f"{self.requested} ({self.multiple} on {self.device} {self.dtype})"

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "multiple": self.multiple, "device": self.device,
                "dtype": self.dtype, "source": self.source}


def check_round_to(value: Any, where: str = "round_to") -> None:
    """Raise :class:`SpecError` unless ``value`` is ``auto``, ``latency`` or an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{where} must be auto, latency or an integer >= 1, got {value!r}")
    if isinstance(value, str) and value not in ROUND_TO_MODES:
        raise SpecError(f"{where} must be auto, latency or an integer >= 1, got {value!r}")
    if isinstance(value, int) and value < 1:
        raise SpecError(f"{where} must be >= 1 (1 keeps exact widths), got {value}")


def runs_on(model: Any) -> tuple[str, str]:
    """``(device type, dtype name)`` the model runs on: those of its first floating-point
    parameter; a ``meta`` model (a shape-only stand-in) runs on this machine's default device."""
    import torch

    device, dtype = "cpu", "float32"
    for p in model.parameters():
        if p.is_floating_point():
            device, dtype = p.device.type, str(p.dtype).removeprefix("torch.")
            break
    if device == "meta":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, dtype


def resolve_round_to(value: Any, *, model: Any = None, device: str | None = None,
                     dtype: str | None = None) -> RoundTo:
    """What ``value`` means for a model on ``device``/``dtype`` (read from ``model`` when not
    given; a model-less call resolves for this machine's default device in float32)."""
    check_round_to(value)
    if device is None or dtype is None:
        if model is not None:
            seen = runs_on(model)
        else:
            import torch

            seen = ("cuda" if torch.cuda.is_available() else "cpu", "float32")
        device, dtype = device or seen[0], dtype or seen[1]
    if not isinstance(value, str):
        return RoundTo(value, value, device, dtype, "given")
    rule = next(r for r in WIDTH_RULES if r.matches(device, dtype))
    return RoundTo(value, rule.multiple, device, dtype, rule.source)
