"""Fusion: one matmul for sibling projections that read the same input (q/k/v, gate/up).

After slicing, a layer often computes several ``nn.Linear`` of one tensor (``q_proj``, ``k_proj``,
``v_proj`` of the normed hidden states; ``gate_proj``, ``up_proj`` of the MLP input). One matmul
over the concatenated weights does the same work with one weight pass and one kernel call, which is
what makes a pruned model with small, odd widths cheap to run.

Siblings are found in the captured graph, not from module names: every ``aten.linear`` whose weight
is the ``weight`` of a plain ``nn.Linear`` is keyed by (parent module, input node); two or more
linears under one key are fused. No architecture appears here; models that already fuse (Phi-3's
``qkv_proj``, GPT-2's ``c_attn``) simply have no siblings.

At runtime the siblings are replaced by :class:`FusedPart` modules that share one
:class:`FusedLinear` child of the parent (named ``fused_<names>``), holding the concatenated weight
and bias. The first part called with an input computes the whole product; the others return their
column slice of it when called with the same tensor object; any other call recomputes (correct,
just unfused). The model's own forward code is untouched, so ``generate()`` with a KV cache,
``torch.export`` and ONNX export keep working. :func:`unfuse` restores the separate linears (for
``save_pruned``, which expects the plan's parameter names).

Remaining per-unit scales are folded first: gates still installed on the model (a ``GateSet``)
are multiplied into their weights, so a gated model can be fused without slicing. An expert gate
at exactly 0 (a router mask) cannot be folded; slice such a model first.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunegraph.errors import PostconditionError, PreconditionError
from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass
from prunegraph.plan.gating import GateSet, installed_gates

__all__ = ["Fuse", "FusedLinear", "FusedPart", "fuse", "unfuse", "sibling_linears",
           "fold_gates"]


class FusedLinear(nn.Module):
    """Concatenated weights of sibling linears; computes their joint product once per input."""

    def __init__(self, names: list[str], linears: list[nn.Linear]) -> None:
        super().__init__()
        ref = linears[0].weight
        self.names = list(names)
        self.in_features = linears[0].in_features
        widths = [lin.out_features for lin in linears]
        self.bounds = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        self.out_features = sum(widths)
        self.had_bias = [lin.bias is not None for lin in linears]
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]),
                                       requires_grad=ref.requires_grad)
            if any(self.had_bias):
                self.bias = nn.Parameter(torch.cat([
                    lin.bias.detach() if lin.bias is not None
                    else torch.zeros(lin.out_features, dtype=ref.dtype, device=ref.device)
                    for lin in linears]), requires_grad=ref.requires_grad)
            else:
                self.register_parameter("bias", None)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._served: set[int] = set()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Columns of part ``index`` of ``x @ W.T + b``, reusing the product computed for ``x``."""
        if x is not self._input or index in self._served:
            self._output = F.linear(x, self.weight, self.bias)
            self._input, self._served = x, set()
        start, stop = self.bounds[index]
        out = self._output[..., start:stop]
        self._served.add(index)
        if len(self._served) == len(self.bounds):
            self._input = self._output = None  # every part served: keep no activations alive
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}[{a}:{b}]" for n, (a, b) in zip(self.names, self.bounds))
        return f"in_features={self.in_features}, out_features={self.out_features}, {parts}"


class FusedPart(nn.Module):
    """Stands where one sibling linear was; its output is a column slice of the fused product.

    ``weight`` and ``bias`` are read-only views into the fused tensors, for code that inspects
    ``proj.weight.dtype`` and the like; the part owns no parameters.
    """

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a child: the parent owns the FusedLinear
        self.index = index
        start, stop = fused.bounds[index]
        self.in_features, self.out_features = fused.in_features, stop - start

    @property
    def weight(self) -> torch.Tensor:
        start, stop = self.fused.bounds[self.index]
        return self.fused.weight[start:stop]

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.fused.had_bias[self.index]:
            return None
        start, stop = self.fused.bounds[self.index]
        return self.fused.bias[start:stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        start, stop = self.fused.bounds[self.index]
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {start}:{stop}"


# ------------------------------------------------------------------------------ detection


def _plain_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward \
        and not parametrize.is_parametrized(module)


def sibling_linears(model: nn.Module, graph: Any = None) -> list[tuple[str, list[str]]]:
    """Sets of sibling linears: ``[(parent path, [child names in call order]), ...]``.

    Reads the captured graph (``prunegraph.ir.capture.capture(model)`` unless ``graph`` is given):
    plain ``nn.Linear`` modules of one parent whose ``aten.linear`` nodes take the same input node.
    Linears with tied weights, called more than once, or of different dtypes are left alone.
    """
    if graph is None:
        from prunegraph.ir.capture import capture

        graph = capture(model)
    modules = dict(model.named_modules())
    tied = {n for names in graph.aliases.values() if len(names) > 1 for n in names}
    keyed: dict[tuple[str, Any], list[str]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        w = node.args[1]
        pname = graph.param_of(w.name) if isinstance(w, torch.fx.Node) else None
        if pname is None or pname in tied:
            continue
        path, _, attr = pname.rpartition(".")
        if attr != "weight" or not _plain_linear(modules.get(path)):
            continue
        calls[path] += 1
        parent, _, child = path.rpartition(".")
        keyed[(parent, node.args[0])].append(child)
    out = []
    for (parent, _), children in keyed.items():
        children = [c for c in children if calls[f"{parent}.{c}" if parent else c] == 1]
        if len(children) < 2:
            continue
        lins = [modules[f"{parent}.{c}" if parent else c] for c in children]
        if len({(lin.weight.dtype, lin.weight.device, lin.in_features) for lin in lins}) != 1:
            continue
        out.append((parent, children))
    return out


# ------------------------------------------------------------------------------- folding


def fold_gates(model_or_gates: nn.Module | GateSet) -> int:
    """Multiply gates into their weights (a :class:`GateSet`, or the gates installed on a model);
    returns how many weights.

    Raises:
        PreconditionError: an experts gate is exactly 0 (its router mask cannot be folded).
    """
    gates = model_or_gates if isinstance(model_or_gates, GateSet) else installed_gates(model_or_gates)
    if gates is None:
        return 0
    for name, group in gates.groups.items():
        if group.constraints.removal == "mask_logit" and bool((gates.values[name] == 0).any()):
            raise PreconditionError(
                f"group {name!r} has experts gated to exactly 0, which mask the router and cannot "
                "be folded into weights; slice the model first (Slice pass / apply_plan)")
    count = 0
    with torch.no_grad():
        for module, attr in list(gates._folded):
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                count += 1
    gates._folded.clear()
    gates.remove()  # the router hooks; weights are plain tensors again
    return count


# -------------------------------------------------------------------------------- fusing


def _fused_name(parent: nn.Module, children: list[str]) -> str:
    base = "fused_" + "_".join(children)
    name, i = base, 1
    while hasattr(parent, name):
        name, i = f"{base}_{i}", i + 1
    return name


def fuse(model: nn.Module, graph: Any = None, *, fold: bool = True,
         gates: GateSet | None = None) -> dict[str, Any]:
    """Fuse sibling linears of ``model`` in place (see the module docstring).

    Args:
        graph: a captured graph of ``model`` (or of its unsliced base: only the structure is read);
            captured when omitted.
        fold: fold gates still installed on the model into their weights first.
        gates: those gates, when the caller holds them (the pipeline's ``state.gates``).

    Returns:
        ``{"fused": [{"module", "parts", "out_features"}], "linears_fused", "scales_folded"}``.
    """
    folded = fold_gates(gates if gates is not None else model) if fold else 0
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PreconditionError("the model has parametrizations that are not prunegraph gates; "
                                "remove them before fusing")
    report = []
    for parent_path, children in sibling_linears(model, graph):
        parent = model.get_submodule(parent_path) if parent_path else model
        linears = [getattr(parent, c) for c in children]
        fused = FusedLinear(children, linears)
        parent.add_module(_fused_name(parent, children), fused)
        for i, c in enumerate(children):
            setattr(parent, c, FusedPart(fused, i))
        report.append({"module": parent_path, "parts": children,
                       "out_features": [b - a for a, b in fused.bounds]})
    return {"fused": report, "linears_fused": sum(len(r["parts"]) for r in report),
            "scales_folded": folded}


def unfuse(model: nn.Module) -> int:
    """Replace every :class:`FusedLinear` by its separate ``nn.Linear`` again; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, FusedLinear):
                continue
            w = child.weight.detach()
            for i, part in enumerate(child.names):
                start, stop = child.bounds[i]
                lin = nn.Linear(child.in_features, stop - start, bias=child.had_bias[i],
                                device="meta")
                lin.weight = nn.Parameter(w[start:stop].clone(),
                                          requires_grad=child.weight.requires_grad)
                if child.had_bias[i]:
                    lin.bias = nn.Parameter(child.bias.detach()[start:stop].clone(),
                                            requires_grad=child.bias.requires_grad)
                setattr(parent, part, lin)
            delattr(parent, name)
            count += 1
    return count


# ---------------------------------------------------------------------------------- pass


@torch.no_grad()
def _probe_logits(model: nn.Module) -> torch.Tensor | None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    ids = torch.randint(0, int(vocab), (2, 8), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids.to(device), use_cache=False).logits.float()


@register_pass
@dataclass(frozen=True)
class Fuse(Pass):
    """Fuse q/k/v and gate/up (any sibling linears sharing an input) into one matmul each, after
    folding remaining gates into weights.

    Uses ``state.graph`` when present (the structure of the unsliced model is the same), else
    captures. ``check`` compares the logits of a short random input before and after.
    Run ``Save`` before ``Fuse`` (or :func:`unfuse` first): saved checkpoints use the plan's
    parameter names.
    """

    name = "Fuse"
    requires = ("model",)
    provides = ("model",)
    invalidates = {
        "plan": "fused modules replace the parameters the plan names (Save before Fuse)",
        "graph": "fusion changed the model's modules", "analysis": "fusion changed the model's modules",
        "groups": "fusion changed the model's modules", "gates": "fusion folded the gates in",
    }

    check: bool = True
    recapture: bool = False

    def run(self, state: State) -> PassResult:
        model = state.model
        before = _probe_logits(model) if self.check else None
        graph = None if self.recapture else state.get("graph")
        report = fuse(model, graph, gates=state.get("gates"))
        if state.has("gates"):
            del state.gates
        if before is not None:
            after = _probe_logits(model)
            diff = float((after - before).abs().max())
            tol = 1e-4 * max(1.0, float(before.abs().max()))
            if diff > tol:
                raise PostconditionError(f"the fused model's logits differ from the unfused ones "
                                         f"by {diff:.3g} (> {tol:.3g}); please report this model")
            report["check_max_abs_diff"] = diff
        state.log.info("fused %d sibling sets (%d linears), folded %d gated weights",
                       len(report["fused"]), report["linears_fused"], report["scales_folded"])
        state.metrics["fuse"] = {k: v for k, v in report.items() if k != "fused"} | {
            "sets": len(report["fused"])}
        return PassResult(state, modified=bool(report["fused"] or report["scales_folded"]),
                          stats={"sets": len(report["fused"]),
                                 "linears_fused": report["linears_fused"],
                                 "scales_folded": report["scales_folded"]})
