"""Per-weight masks: the artifact of unstructured and N:M (2:4) pruning.

Structured pruning removes units and slices the model (a :class:`~prunegraph.plan.Plan`). Weight
pruning keeps every shape and zeroes individual weights; what it produces is a :class:`MaskSet`,
one boolean tensor per masked weight (``True`` = kept), keyed by parameter name::

    masks = MaskSet({"model.layers.0.mlp.down_proj.weight": keep, ...}, pattern="2:4",
                    method="wanda", in_dims={"model.layers.0.mlp.down_proj.weight": 1})
    masks.apply_(model)              # zeros in place: the model is a plain HF model again
    masks.save("masks.safetensors")  # bool tensors + text metadata
    masks.table()                    # one row per weight: layer, kind, shape, kept, sparsity

Which weights are masked (:func:`sparse_linears`): every linear module of the model (``nn.Linear``
and the GPT-2 style ``Conv1D``) except the output embedding (``lm_head``, tied or not: LEAP
leaves embeddings and ``lm_head`` dense), MoE routers and expert
gates (:data:`ROUTING_WEIGHTS`, a table of names: they choose, they do not transform), and any
whose weight name matches one of the ``skip`` regexes. Fused 3-D expert tensors of MoE models are
not linear modules and stay dense.

**N:M along the input dimension.** ``"2:4"`` means at most 2 nonzeros in every group of 4
consecutive weights along the dimension that indexes *input* features (``in_dims``: 1 for
``nn.Linear``'s ``[out, in]``, 0 for ``Conv1D``'s ``[in, out]``), the pattern sparse tensor cores
run (cuSPARSELt's operand ``A = W``, reduced over ``K = in``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunegraph.errors import CheckpointError, PrunegraphError, SpecError
from prunegraph.plan.gating import linear_input_dim, linear_weight

__all__ = ["MaskSet", "sparse_linears", "parse_pattern", "nm_violations", "layer_index",
           "input_dim", "masks_from", "MASKS_FILE", "ROUTING_WEIGHTS"]

#: File name of the masks next to a saved checkpoint.
MASKS_FILE = "masks.safetensors"
#: Weights of linears that route tokens (MoE routers, shared-expert gates): never masked.
ROUTING_WEIGHTS = (r"\.mlp\.gate\.weight$", r"\.router(\.[a-z_]+)?\.weight$",
                   r"\.shared_expert_gate\.weight$")
_LAYER = re.compile(r"\.(\d+)\.")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)`` with ``0 < N < M``; else a SpecError."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        hint = (" (quote it in YAML: pattern: '2:4'; unquoted, YAML reads 2:4 as the "
                "base-60 number 124)" if isinstance(pattern, int) else "")
        raise SpecError(f"sparsity pattern must be 'unstructured' or 'N:M' with 0 < N < M "
                        f"(e.g. '2:4'), got {pattern!r}{hint}")
    return int(m.group(1)), int(m.group(2))


#: The weight dim that indexes input features (1 for ``nn.Linear``, 0 for GPT-2's ``Conv1D``).
input_dim = linear_input_dim


def sparse_linears(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, tuple[nn.Module, int]]:
    """``weight name -> (linear module, input dim)`` of every weight that weight pruning masks
    (see the module docstring), in module order."""
    patterns = [re.compile(s) for s in (*ROUTING_WEIGHTS, *skip)]
    getters = [getattr(model, g, None) for g in ("get_output_embeddings", "get_input_embeddings")]
    embeddings = {id(getattr(m, "weight", None)) for m in (g() for g in getters if g is not None)
                  if m is not None}
    out = {}
    for path, mod in model.named_modules():
        dim = input_dim(mod)
        if dim is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        name = f"{path}.weight" if path else "weight"
        if id(mod.weight) in embeddings:
            continue
        if any(p.search(name) for p in patterns):
            continue
        out[name] = (mod, dim)
    return out


def nm_violations(keep: torch.Tensor, n: int, m: int, dim: int) -> int:
    """Number of groups of ``m`` consecutive entries along ``dim`` with more than ``n`` kept
    (a dim that is not a multiple of ``m`` is itself a violation: raises)."""
    if keep.shape[dim] % m:
        raise SpecError(f"the {n}:{m} pattern needs the input dim ({keep.shape[dim]}) to be a "
                        f"multiple of {m}")
    k = keep.movedim(dim, -1)
    groups = k.reshape(*k.shape[:-1], k.shape[-1] // m, m).sum(-1)
    return int((groups > n).sum())


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to: the first ``.<int>.`` in its name."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _kind(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


@dataclass
class MaskSet:
    """Kept-weight masks (``True`` = kept) keyed by weight name; see the module docstring.

    ``pattern`` is ``"unstructured"`` or ``"N:M"``; ``in_dims`` gives each weight's input dim (for
    the N:M check); ``method`` and ``target_sparsity`` are recorded with the masks.
    """

    masks: dict[str, torch.Tensor]
    pattern: str = "unstructured"
    method: str = ""
    target_sparsity: float | None = None
    in_dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        bad = [n for n, m in self.masks.items() if m.dtype != torch.bool]
        if bad:
            raise PrunegraphError(f"masks must be bool tensors (True = kept); not for "
                                  f"{', '.join(bad[:3])}")

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.masks)

    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        """Fraction of the masked weights that are zeroed."""
        total = self.numel()
        return 1.0 - self.kept() / total if total else 0.0

    def check_pattern(self) -> None:
        """Raise unless every mask follows ``pattern`` (N:M along its input dim)."""
        nm = parse_pattern(self.pattern)
        if nm is None:
            return
        bad = {name: v for name, m in self.masks.items()
               if (v := nm_violations(m, *nm, self.in_dims.get(name, m.dim() - 1)))}
        if bad:
            listing = ", ".join(f"{n} ({v} groups)" for n, v in list(bad.items())[:3])
            raise PrunegraphError(f"masks break the {self.pattern} pattern: {listing}")

    def table(self) -> list[dict[str, Any]]:
        """One row per weight: name, layer, kind (``q_proj`` ...), shape, params, kept, sparsity."""
        rows = []
        for name, m in self.masks.items():
            kept = int(m.sum())
            rows.append({"name": name, "layer": layer_index(name), "kind": _kind(name),
                         "shape": list(m.shape), "params": m.numel(), "kept": kept,
                         "sparsity": 1.0 - kept / m.numel()})
        return rows

    def per_layer(self) -> dict[int | None, float]:
        """Sparsity of each decoder layer's masked weights together."""
        num: dict[int | None, int] = {}
        den: dict[int | None, int] = {}
        for row in self.table():
            num[row["layer"]] = num.get(row["layer"], 0) + row["kept"]
            den[row["layer"]] = den.get(row["layer"], 0) + row["params"]
        return {k: 1.0 - num[k] / den[k] for k in den}

    # -- as a gate family's result (what Finalize and Train's polish read) ------------------

    def gate_values(self) -> dict[str, torch.Tensor]:
        """The masks as 0/1 float multipliers."""
        return {n: m.float() for n, m in self.masks.items()}

    @property
    def report(self) -> dict[str, Any]:
        """Removed weights, as a plan reports removed parameters."""
        removed = self.numel() - self.kept()
        return {"params_removed": removed,
                "params_fraction": removed / self.numel() if self.numel() else 0.0,
                "pattern": self.pattern}

    # -- the model -------------------------------------------------------------------------

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> int:
        """Zero the removed weights of ``model`` in place; returns how many weights were masked."""
        params = dict(model.named_parameters())
        missing = [n for n in self.masks if n not in params]
        if missing:
            raise PrunegraphError(f"the model has no weight {missing[0]!r} (and {len(missing) - 1} "
                                  f"more); the masks were made for another model")
        for name, m in self.masks.items():
            p = params[name]
            if tuple(p.shape) != tuple(m.shape):
                raise PrunegraphError(f"mask of {name} has shape {tuple(m.shape)}, the weight "
                                      f"{tuple(p.shape)}; the masks were made for another model")
        for name, m in self.masks.items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))
        return len(self.masks)

    @classmethod
    def from_model(cls, model: nn.Module, skip: Iterable[str] = (), pattern: str = "unstructured",
                   method: str = "from_zeros") -> MaskSet:
        """The masks a model's zeros describe (a checkpoint saved with zeros in place)."""
        linears = sparse_linears(model, skip)
        return cls({n: (linear_weight(mod).detach() != 0).cpu() for n, (mod, _) in linears.items()},
                   pattern=pattern, method=method,
                   in_dims={n: d for n, (_, d) in linears.items()})

    # -- files -----------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": "prunegraph-masks", "version": "1", "pattern": self.pattern,
                "method": self.method,
                "target_sparsity": "" if self.target_sparsity is None
                else repr(float(self.target_sparsity)),
                "sparsity": repr(self.sparsity()), "in_dims": json.dumps(self.in_dims)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the masks as a safetensors file (bool tensors, text metadata), atomically."""
        from safetensors.torch import save

        from prunegraph.pipeline.runfolder import atomic_write_bytes

        data = save({n: m.contiguous().cpu() for n, m in self.masks.items()},
                    metadata=self.metadata())
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no mask file at {path}; save one with MaskSet.save")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                masks = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"mask file {path} is corrupt or truncated ({e}); save it "
                                  f"again") from e
        if meta.get("format") != "prunegraph-masks":
            raise CheckpointError(f"{path} is not a prunegraph mask file (no "
                                  f"format=prunegraph-masks metadata)")
        target = meta.get("target_sparsity") or None
        return cls(masks, pattern=meta.get("pattern", "unstructured"),
                   method=meta.get("method", ""),
                   target_sparsity=float(target) if target is not None else None,
                   in_dims={k: int(v) for k, v in json.loads(meta.get("in_dims", "{}")).items()})


def masks_from(keep: Mapping[str, torch.Tensor], linears: Mapping[str, tuple[nn.Module, int]],
               **kw: Any) -> MaskSet:
    """A :class:`MaskSet` from kept-weight tensors of :func:`sparse_linears` weights (on CPU)."""
    return MaskSet({n: k.detach().bool().cpu() for n, k in keep.items()},
                   in_dims={n: linears[n][1] for n in keep}, **kw)
