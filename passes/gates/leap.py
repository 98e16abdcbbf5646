"""LEAP gates (methods.md §2): one learned Bernoulli logit per weight of every decoder linear.

The site is the weight itself. For a linear with frozen weight ``W`` and logits ``P`` (same
shape, bf16 by default) the forward uses ``W * M`` with the soft mask::

    M = sigmoid((alpha * (P - shift) + g) / tau),   g = log(u) - log(1 - u),  u ~ U(0, 1)

a fresh logistic sample ``g`` per weight and forward (the difference of two Gumbels, what the
reference's two-logit Gumbel-softmax draws), no straight-through estimator. ``alpha`` goes
25 -> 350 and ``tau`` 4 -> 0.05, linear in the step (:func:`leap_schedule`), so ``M`` hardens
towards ``P > shift``. ``shift`` is 0 in the search (LEAP as published); for ``pattern="2:4"``
it is each group's midpoint between its 2nd and 3rd largest logit (the logits projected to the
best 2 of 4, so the hard mask is 2:4 at every step); in the polish it is the exact top-k
threshold (see :mod:`prunegraph.passes.gates.leap_objective`).

**Initialisation** (methods.md §2.3): a one-shot Wanda mask at the target sparsity (per output
row; 2:4 for ``pattern="2:4"``) on calibration text, then ``P = N(0, init_std) + (2 keep - 1) *
std * prior_strength`` (0.014 and 3 by default: about +-0.042, keep probabilities near 0.56 at
step 0).

**Memory.** No mask is stored: each linear's forward runs :class:`_LeapLinear`, which draws the
noise from a seed (fixed per step, micro-batch and layer), builds ``M`` and ``W * M`` for that
layer only, and saves only its input; the backward draws the same noise again and rebuilds them.
What persists per weight is the logit, its gradient and AdamW's two moments (all in the logits'
dtype) besides the frozen weight. ``checkpointing=True`` also recomputes each decoder layer's
activations in the backward (the seeds make the recomputed masks identical).

**Final mask** (:meth:`LeapGates.final_masks`): ``topk`` (default) keeps exactly the budget's
weights with the largest logits over all masked linears (per decoder block with
``scope="group"``; ties broken by ``|W|``) with :func:`~prunegraph.passes.sparse_masks.global_topk`;
``threshold`` keeps ``P > 0``, the reference code's rule (achieved sparsity as trained). 2:4
keeps the 2 largest logits of every 4.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunegraph.errors import BudgetError, SpecError
from prunegraph.passes.gates.base import GateFamily
from prunegraph.passes.gates.options import FamilyOptions
from prunegraph.passes.gates.registry import register_family
from prunegraph.plan.masks import MaskSet, layer_index, masks_from, parse_pattern

__all__ = ["LeapGates", "LeapOptions", "LeapMasks", "leap_schedule", "soft_mask", "MaskSpec",
           "nm_shift", "mix_seed"]

_LOGIT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def leap_schedule(step: int, total: int, alpha: tuple[float, float] = (25.0, 350.0),
                  tau: tuple[float, float] = (4.0, 0.05)) -> tuple[float, float]:
    """``(alpha, tau)`` at ``step`` of ``total``: both linear in ``step / total``."""
    p = min(max(step / max(total, 1), 0.0), 1.0)
    return alpha[0] * (1 - p) + alpha[1] * p, tau[0] * (1 - p) + tau[1] * p


@dataclass(frozen=True)
class MaskSpec:
    """How one forward builds its soft masks: the schedule values, the noise seed (None: no
    noise), the N:M pattern and a global shift of the logits."""

    alpha: float
    tau: float
    seed: int | None
    nm: tuple[int, int] | None = None
    shift: float = 0.0


def nm_shift(logits: torch.Tensor, n: int, m: int, in_dim: int) -> torch.Tensor:
    """Per group of ``m`` inputs, the midpoint between its ``n``-th and ``n+1``-th largest
    logit (shaped to broadcast against ``logits``)."""
    p = logits.detach().float().movedim(in_dim, -1)
    g = p.reshape(*p.shape[:-1], p.shape[-1] // m, m)
    top = g.topk(n + 1, dim=-1).values
    mid = 0.5 * (top[..., n - 1] + top[..., n])
    return mid.unsqueeze(-1).expand_as(g).reshape(p.shape).movedim(-1, in_dim)


def _noise(shape, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    u = u.clamp_(1e-6, 1.0 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def soft_mask(logits: torch.Tensor, spec: MaskSpec, in_dim: int) -> torch.Tensor:
    """``sigmoid((alpha * (P - shift) + g) / tau)`` in float32 (see the module docstring)."""
    z = logits.detach().float()
    if spec.nm is not None:
        z = z - nm_shift(logits, *spec.nm, in_dim)
    elif spec.shift:
        z = z - spec.shift
    z = z * spec.alpha
    if spec.seed is not None:
        z = z + _noise(logits.shape, spec.seed, logits.device)
    return torch.sigmoid(z / spec.tau)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


class _LeapLinear(torch.autograd.Function):
    """``y = linear(x, W * M)`` plus ``sum(M)`` and ``||W * M||_F^2`` with ``M`` rebuilt in the
    backward instead of saved (see the module docstring)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, logits, spec: MaskSpec, in_dim: int):
        dt = _compute_dtype(x)
        M = soft_mask(logits, spec, in_dim)
        Wf = weight.detach().float()
        Weff = Wf * M
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        Wd = Weff.to(dt)
        y = x2 @ (Wd.t() if in_dim == 1 else Wd)
        if bias is not None:
            y = y + bias.to(dt)
        ctx.save_for_backward(x2, weight, logits)
        ctx.spec, ctx.in_dim, ctx.x_shape, ctx.x_dtype = spec, in_dim, x.shape, x.dtype
        ctx.has_bias = bias is not None
        m_sum = M.sum()
        sq = Weff.pow(2).sum()
        return y.reshape(*x.shape[:-1], y.shape[-1]), m_sum, sq

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy, g_sum, g_sq):
        x2, weight, logits = ctx.saved_tensors
        spec, in_dim = ctx.spec, ctx.in_dim
        M = soft_mask(logits, spec, in_dim)
        Wf = weight.detach().float()
        Weff = Wf * M
        dt = x2.dtype
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dt)
        Wd = Weff.to(dt)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (gy2 @ (Wd if in_dim == 1 else Wd.t())).reshape(ctx.x_shape).to(ctx.x_dtype)
        gbias = gy2.float().sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] \
            else None
        gP = None
        if ctx.needs_input_grad[3]:
            gW = (gy2.t() @ x2 if in_dim == 1 else x2.t() @ gy2).float()
            gM = gW * Wf
            if g_sum is not None:
                gM = gM + g_sum.float()
            if g_sq is not None:
                gM = gM + g_sq.float() * 2.0 * M * Wf * Wf
            gP = (gM * M * (1.0 - M) * (spec.alpha / spec.tau)).to(logits.dtype)
        return gx, None, gbias, gP, None, None


class LeapMasks:
    """The installed LEAP forward on a model's masked linears (``state.gates`` for LEAP).

    Each masked module's ``forward`` is replaced (an instance attribute; :meth:`remove` deletes
    it) by one that runs :class:`_LeapLinear` with the family's logits and the current
    :class:`MaskSpec` (noise only while the family is in training mode; ``shifts`` per weight in
    the polish), and records ``(name, sum(M), ||W*M||^2)`` for the penalty. ``enabled=False``
    runs the plain linear (the teacher: every mask at 1).
    """

    def __init__(self, family: LeapGates, modules: dict[str, tuple[nn.Module, int]],
                 layers: nn.ModuleList | None = None, checkpointing: bool = False) -> None:
        self.family, self.modules = family, modules
        self.enabled = True
        self.spec = MaskSpec(1.0, 1.0, None)
        self.base_seed = 0
        self.records: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.shifts: dict[str, float] = {}
        #: The live logits each forward builds its masks from (the handle's ``values``).
        self.values = {name: family.logit(name) for name in modules}
        self._layers: list[nn.Module] = []
        for idx, (name, (mod, dim)) in enumerate(modules.items()):
            mod.forward = types.MethodType(self._forward_for(name, idx, dim), mod)
        if checkpointing and layers is not None:
            for layer in layers:
                layer.forward = types.MethodType(_checkpointed(type(layer).forward), layer)
                self._layers.append(layer)

    def _forward_for(self, name: str, idx: int, dim: int):
        masks = self

        def forward(mod, x):
            if not masks.enabled:
                return type(mod).forward(mod, x)
            base = masks.spec
            seed = mix_seed(masks.base_seed, idx) if masks.family.training else None
            spec = MaskSpec(base.alpha, base.tau, seed, base.nm, masks.shifts.get(name, 0.0))
            y, m_sum, sq = _LeapLinear.apply(x, mod.weight, mod.bias,
                                             masks.family.logit(name), spec, dim)
            masks.records.append((name, m_sum, sq))
            return y

        return forward

    @contextlib.contextmanager
    def at_one(self) -> Iterator[None]:
        """Every mask at 1 inside the block: the plain linears (the teacher, the
        ``gates-at-one`` check)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def set(self, spec: MaskSpec, base_seed: int) -> None:
        """The mask spec and noise seed base of the next forward; clears the records."""
        self.spec, self.base_seed = spec, base_seed
        self.records = []

    def remove(self) -> None:
        """Give every module its own forward back."""
        for mod, _ in self.modules.values():
            mod.__dict__.pop("forward", None)
        for layer in self._layers:
            layer.__dict__.pop("forward", None)
        self._layers = []
        self.records = []


def mix_seed(base: int, idx: int) -> int:
    """A 63-bit seed for layer ``idx`` of the forward with seed base ``base``."""
    return (base * 1_000_003 + idx * 7_919 + 12_345) % (2 ** 63 - 1)


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(layer, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(layer, *args, **kwargs)
        return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)

    return run


@dataclass(frozen=True)
class LeapOptions(FamilyOptions):
    """LEAP's options (``Gate: {family: leap, options: {...}}``).

    ``pattern``: ``unstructured`` or ``N:M`` (quote ``'2:4'`` in YAML); ``alpha``/``tau``: the
    ``(start, end)`` of the anneal; ``lambda1`` (density term), ``lambda2`` (magnitude term,
    decayed to 0); ``prior_strength`` and ``init_std`` of the initial logits; ``logits_dtype``;
    ``init`` (the one-shot mask the logits start from) with ``calib_blocks`` x ``block_len``
    calibration tokens of ``source``; ``block_targets`` (``{layer: sparsity}`` with ``scope:
    group``); ``checkpointing`` (recompute each decoder layer in the backward); ``skip`` (regexes of
    weights left dense); ``betas`` of AdamW (the reference's 0.95).
    """

    pattern: str | int = "unstructured"  # int only to explain an unquoted YAML 2:4 (= 124)
    alpha: tuple[float, float] = (25.0, 350.0)
    tau: tuple[float, float] = (4.0, 0.05)
    lambda1: float = 7.0
    lambda2: float = 10.0
    prior_strength: float = 3.0
    init_std: float = 0.014
    logits_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    init: Literal["wanda", "magnitude"] = "wanda"
    calib_blocks: int = 128
    block_len: int = 128
    source: str = "wikipedia"
    block_targets: dict[str, float] = field(default_factory=dict)
    checkpointing: bool = False
    skip: tuple[str, ...] = ()
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self) -> None:
        where = self._where()
        parse_pattern(self.pattern)
        for key in ("alpha", "tau"):
            if min(getattr(self, key)) <= 0:
                raise SpecError(f"{where}: {key} must be two positive numbers (start, end), "
                                f"got {getattr(self, key)}")
        if min(self.lambda1, self.lambda2, self.prior_strength) < 0 or self.init_std <= 0:
            raise SpecError(f"{where}: lambda1, lambda2 and prior_strength must be >= 0 and "
                            f"init_std > 0")
        if self.calib_blocks < 1 or self.block_len < 2:
            raise SpecError(f"{where}: calib_blocks must be >= 1 and block_len >= 2")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise SpecError(f"{where}: betas must lie in [0, 1), got {self.betas}")
        for s in self.skip:
            try:
                re.compile(s)
            except re.error as e:
                raise SpecError(f"{where}: skip pattern {s!r} is not a regex ({e})") from None
        for key, value in self.block_targets.items():
            if not str(key).isdigit() or not 0.0 <= value < 1.0:
                raise SpecError(f"{where}: block_targets maps decoder layer indices to a "
                                f"sparsity in [0, 1); got {key!r}: {value}")


@register_family
class LeapGates(GateFamily):
    """LEAP: a learned Bernoulli logit per weight of every decoder linear, Gumbel-sigmoid
    relaxed and annealed, under a global density budget (methods.md §2).

    The masked weights are :func:`~prunegraph.passes.sparse_prune.prunable_weights`; ``sparsity``
    is the fraction of them removed (``pattern: '2:4'`` needs 0.5). ``scope`` ``global`` is one
    density over every masked weight (LEAP's default), ``group`` one per decoder block. The
    family trains through its own objective (:meth:`objective`; the loop is ``Train``'s) and
    finalizes to a :class:`~prunegraph.plan.masks.MaskSet`.
    """

    name = "leap"
    site = "weight"
    options_type = LeapOptions
    default_lr = 1e-3

    @classmethod
    def check_settings(cls, *, budget: str, scope: str, kinds: tuple[str, ...]) -> None:
        if budget != "params":
            raise SpecError("Gate(family: leap) masks weights; its sparsity is a fraction of the "
                            "masked weights (leave budget: params)")
        if scope not in ("global", "group"):
            raise SpecError(f"Gate(family: leap): scope must be global or group, got {scope!r}")

    @classmethod
    def check_sparsity(cls, sparsity: float, options: LeapOptions) -> None:
        """An N:M pattern fixes the sparsity (2:4: 0.5); checked when ``Gate`` is built."""
        from prunegraph.passes.sparse_prune import resolve_sparsity

        resolve_sparsity(sparsity, options.pattern, "Gate(family: leap)")

    def __init__(self, groups, sparsity: float, model: nn.Module | None = None,
                 options: LeapOptions | dict[str, Any] | None = None, **settings: Any) -> None:
        from prunegraph.passes.sparse_prune import prunable_weights, resolve_sparsity

        super().__init__(groups, sparsity, model, options, **settings)
        o = self.options
        if model is None:
            raise SpecError("Gate(family: leap) needs the model: its gates sit on the weights")
        self.sparsity = resolve_sparsity(sparsity, o.pattern, "Gate(family: leap)")
        if o.block_targets and (self.scope != "group" or parse_pattern(o.pattern) is not None):
            raise SpecError("Gate(family: leap): block_targets need scope: group and an "
                            "unstructured pattern")
        self.nm = parse_pattern(o.pattern)
        self.pattern = o.pattern
        self.alpha, self.tau = tuple(map(float, o.alpha)), tuple(map(float, o.tau))
        self.lambda1, self.lambda2 = float(o.lambda1), float(o.lambda2)
        self.prior_strength, self.init_std = float(o.prior_strength), float(o.init_std)
        self.logits_dtype, self.init = _LOGIT_DTYPES[o.logits_dtype], o.init
        self.calib = dict(calib_blocks=o.calib_blocks, block_len=o.block_len, source=o.source)
        self.checkpointing, self.betas = bool(o.checkpointing), tuple(map(float, o.betas))
        self.linears = prunable_weights(model, o.skip)
        if not self.linears:
            raise BudgetError("Gate(family: leap): the model has no decoder linear to mask")
        if self.nm is not None:
            bad = [n for n, (m, d) in self.linears.items() if m.weight.shape[d] % self.nm[1]]
            if bad:
                raise SpecError(f"Gate(family: leap): {o.pattern} needs every input dim to be a "
                                f"multiple of {self.nm[1]}; {bad[0]} is not (skip it)")
        self.blocks = {n: layer_index(n) for n in self.linears}
        self.block_targets = self._block_targets(dict(o.block_targets))
        self.numel = {n: m.weight.numel() for n, (m, _) in self.linears.items()}
        self.weight_norm = {n: float(m.weight.detach().float().norm())
                            for n, (m, _) in self.linears.items()}
        self.logits = nn.ParameterDict()
        self._handle: LeapMasks | None = None

    def _block_targets(self, given: dict[str, float]) -> dict[int | None, float]:
        blocks = sorted({b for b in self.blocks.values() if b is not None})
        if given and (self.scope != "group" or self.nm is not None):
            raise SpecError("Gate(family: leap): block_targets need scope: group and an "
                            "unstructured pattern")
        out: dict[int | None, float] = {b: self.sparsity for b in blocks}
        for key, value in given.items():
            if not str(key).isdigit() or int(key) not in out:
                raise SpecError(f"Gate(family: leap): block_targets key {key!r} is not a decoder "
                                f"layer index (0..{len(blocks) - 1})")
            if not 0.0 <= float(value) < 1.0:
                raise SpecError(f"Gate(family: leap): block target {key}: {value} is outside [0, 1)")
            out[int(key)] = float(value)
        return out

    # -- parameters ------------------------------------------------------------------------

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "/")

    def logit(self, name: str) -> nn.Parameter:
        return self.logits[self.key(name)]

    @torch.no_grad()
    def initialise(self, model: nn.Module, tokenizer: Any = None, progress: bool = False) -> dict:
        """Logits from a one-shot mask at the target (module docstring); weights untouched."""
        from prunegraph.passes.sparse_prune import oneshot_masks

        blocks = None
        if self.init == "wanda":
            if tokenizer is None:
                raise SpecError("Gate(family: leap): init: wanda needs a tokenizer for "
                                "calibration text; load a model with one or use init: magnitude")
            from prunegraph.data.blocks import text_blocks

            blocks = text_blocks(tokenizer, self.calib["source"], "calibration",
                                 self.calib["block_len"], self.calib["calib_blocks"])
        masks, forwards = oneshot_masks(model, self.init, self.sparsity, self.pattern, blocks,
                                        skip=(), progress=progress, apply=False,
                                        names=self.linears)
        gens: dict[torch.device, torch.Generator] = {}
        for name, (mod, _) in self.linears.items():
            device = mod.weight.device  # drawn where the weight lives (8B: 7e9 draws)
            gen = gens.setdefault(device, torch.Generator(device=device).manual_seed(self.seed))
            keep = masks.masks[name].to(device)
            noise = torch.randn(keep.shape, generator=gen, device=device) * self.init_std
            prior = (2.0 * keep.float() - 1.0) * float(noise.std()) * self.prior_strength
            self.logits[self.key(name)] = nn.Parameter((noise + prior).to(self.logits_dtype))
            del noise, prior
        return {"init": self.init, "forwards": forwards,
                "init_sparsity": round(masks.sparsity(), 6)}

    def install(self, model: nn.Module) -> LeapMasks:
        """Put the LEAP forward on the masked linears (see :class:`LeapMasks`)."""
        from prunegraph.passes._layerwise import decoder_layers

        if len(self.logits) != len(self.linears):
            raise SpecError("LeapGates.install before initialise(): the logits do not exist yet")
        _, layers = decoder_layers(model)
        self._handle = LeapMasks(self, self.linears, layers, self.checkpointing)
        return self._handle

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.logits.values()), "lr": self.lr, "weight_decay": 0.0,
                 "betas": self.betas, "name": "logits", "schedule": "cosine"}]

    # -- schedule and penalty --------------------------------------------------------------

    def schedule(self, step: int, total: int) -> dict[str, float]:
        a, t = leap_schedule(step, total, self.alpha, self.tau)
        return {"alpha": a, "tau": t}

    def target_sparsity(self) -> float:
        """Removed fraction of the masked weights the budget asks for."""
        total = sum(self.numel.values())
        removed = sum(self.numel[n] * self._target_of(n) for n in self.numel)
        return removed / total

    def _target_of(self, name: str) -> float:
        return self.block_targets.get(self.blocks[name], self.sparsity)

    def penalty_terms(self, records, step: int, total: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """``lambda1 * |density - target|`` (global, or the mean over blocks) ``- lambda2 *
        (1 - t/T) * sum ||M*W||_F / sum ||W||_F`` over the masked linears of one forward."""
        if not records:
            raise SpecError("LEAP: the forward reached no masked linear; nothing to train")
        sums: dict[int | None, list] = {}
        num, den = [], 0.0
        fro, wnorm = [], 0.0
        for name, m_sum, sq in records:
            key = self.blocks[name] if self.scope == "group" else None
            acc = sums.setdefault(key, [[], 0, 0.0])
            acc[0].append(m_sum)
            acc[1] += self.numel[name]
            acc[2] += self.numel[name] * (1.0 - self._target_of(name))
            num.append(m_sum)
            den += self.numel[name]
            fro.append(torch.sqrt(sq + 1e-12))
            wnorm += self.weight_norm[name]
        density = torch.stack(num).sum() / den
        loss = density.new_zeros(())
        if self.nm is None and self.lambda1:
            gaps = [(torch.stack(v[0]).sum() / v[1] - v[2] / v[1]).abs() for v in sums.values()]
            loss = loss + self.lambda1 * torch.stack(gaps).mean()
        decay = max(0.0, 1.0 - step / max(total, 1))
        ratio = torch.stack(fro).sum() / wnorm
        if self.lambda2 and decay > 0:
            loss = loss - self.lambda2 * decay * ratio
        return loss, {"expected_sparsity": 1.0 - float(density.detach()),
                      "weight_ratio": float(ratio.detach()), "penalty": float(loss.detach())}

    # -- reading the logits ----------------------------------------------------------------

    @torch.no_grad()
    def threshold_sparsity(self) -> float:
        """Fraction of weights the reference rule (``P > 0``) would remove now (N:M: the
        pattern's, which the group shift meets at every step)."""
        if self.nm is not None:
            return 1.0 - self.nm[0] / self.nm[1]
        kept = sum(int((p > 0).sum()) for p in self.logits.values())
        return 1.0 - kept / sum(self.numel.values())

    def _scopes(self) -> list[list[str]]:
        if self.scope == "global":
            return [list(self.linears)]
        by: dict[int | None, list[str]] = {}
        for n in self.linears:
            by.setdefault(self.blocks[n], []).append(n)
        return list(by.values())

    def _k(self, names: list[str]) -> int:
        return sum(self.numel[n] - round(self.numel[n] * self._target_of(n)) for n in names)

    @torch.no_grad()
    def exact_shift(self) -> dict[str, float]:
        """Per weight, the logit value between the kept and removed ones of the exact top-k
        (global or per block): ``P > shift`` keeps exactly the budget."""
        from prunegraph.passes.sparse_masks import ordered_key, topk_threshold

        out = {}
        for names in self._scopes():
            tensors = [self.logit(n) for n in names]
            k = self._k(names)
            total = sum(t.numel() for t in tensors)
            if k >= total:
                value = -math.inf
            else:
                key, _ = topk_threshold(tensors, k)
                kth = torch.tensor([key], dtype=torch.int32)
                kth = (kth ^ ((kth >> 31) & 0x7FFFFFFF)).view(torch.float32)
                below = max((float(t.float()[ordered_key(t) < key].max())
                             for t in tensors if bool((ordered_key(t) < key).any())),
                            default=float(kth) - 1.0)
                value = 0.5 * (float(kth) + below)
            out.update({n: value for n in names})
        return out

    @torch.no_grad()
    def final_masks(self, mode: str = "topk") -> MaskSet:
        """The hard masks (module docstring): ``topk`` (exact budget) or ``threshold``."""
        from prunegraph.passes.sparse_masks import global_topk, keep_nm

        keep: dict[str, torch.Tensor] = {}
        if self.nm is not None:
            for n, (_, d) in self.linears.items():
                keep[n] = keep_nm(self.logit(n).float(), *self.nm, d)
        elif mode == "threshold":
            keep = {n: self.logit(n) > 0 for n in self.linears}
        elif mode == "topk":
            for names in self._scopes():
                keep.update(global_topk(
                    {n: self.logit(n) for n in names}, self._k(names),
                    tiebreak={n: self.linears[n][0].weight.detach().abs() for n in names}))
        else:
            raise SpecError(f"LEAP final mask mode must be topk or threshold, got {mode!r}")
        return masks_from(keep, self.linears, pattern=self.pattern, method="leap",
                          target_sparsity=self.target_sparsity())

    # -- the GateFamily interface ----------------------------------------------------------

    def forward_values(self, step: int, total: int) -> dict[str, torch.Tensor]:
        """Every weight's soft mask at ``step`` without noise (for inspection: training builds
        each layer's mask inside its forward instead, :class:`_LeapLinear`)."""
        a, t = leap_schedule(step, total, self.alpha, self.tau)
        return {n: soft_mask(self.logit(n), MaskSpec(a, t, None, self.nm), d)
                for n, (_, d) in self.linears.items()}

    def penalty(self, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The budget terms of the masks the installed forward just used."""
        if self._handle is None:
            raise SpecError("LeapGates.penalty before install(): no forward to read")
        return self.penalty_terms(self._handle.records, step, total)

    def final_values(self) -> dict[str, torch.Tensor]:
        """The logits (what Finalize ranks)."""
        return {n: self.logit(n).detach() for n in self.linears}

    def kept_fraction(self, values: dict[str, torch.Tensor]) -> float:
        """Fraction of weights with a positive value (the reference rule on logits)."""
        kept = sum(int((values[n] > 0).sum()) for n in self.linears)
        return kept / sum(self.numel.values())

    def progress_keys(self) -> tuple[str, ...]:
        return ("expected_sparsity", "threshold_sparsity")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weights": len(self.linears)}

    def finalize(self, values: dict[str, torch.Tensor] | None = None, *, mode: str = "topk",
                 **_: Any) -> MaskSet:
        """The hard masks (:meth:`final_masks`): a MaskSet, whose ``gate_values()`` and
        ``report`` are what Train's polish and Finalize read of a family's result."""
        return self.final_masks(mode)

    def write_plots(self, folder, history, final) -> None:
        from prunegraph.passes.gates.leap_objective import write_leap_plots

        write_leap_plots(folder, history, self)

    def objective(self, gates: LeapMasks, kd_weight: float = 0.0, polish_steps: int = 0,
                  model=None):
        """This family as a Train objective (:mod:`prunegraph.passes.gates.leap_objective`)."""
        from prunegraph.passes.gates.leap_objective import LeapObjective

        return LeapObjective(self, gates, kd_weight=kd_weight, polish_steps=polish_steps)
