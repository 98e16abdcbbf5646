"""Swap SwiGLU MLP modules' forward for Triton kernels, and back.

Two installers share :func:`uninstall`: :func:`install_triton_mlps` (dense or pruned MLPs, the
generated fused SwiGLU launchers) and :func:`install_prunepath_mlps` (a PrunePath model's routed
MLPs, the decode and grouped prefill kernels of :mod:`~prunegraph.targets.triton.prunepath`).

For :func:`install_triton_mlps` an MLP qualifies when the captured graph shows its forward is
exactly ``down(silu(x @ Wg^T) * (x @ Wu^T))`` with no bias (a gated MLP of
:mod:`~prunegraph.targets.triton.patterns`, whatever its modules are called; a fused
``gate_up_proj`` too); the caller names the modules by path or passes the patterns found.
:func:`install_prunepath_mlps` finds the gate, up and down weights from the
routers' MoEfy layout (fused ``gate_up_proj`` too), so nothing here knows an architecture.
Either installed forward falls back to the module's own forward, with one warning per reason,
when the kernels cannot run: the input is on a device triton does not target (anything but
CUDA/ROCm/XPU, unless ``TRITON_INTERPRET=1``), its dtype differs from the weights', or autograd
needs a graph (the kernels have no backward).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunegraph.errors import PreconditionError
from prunegraph.passes.prunepath import router as pp
from prunegraph.targets.triton.codegen import MLPShape, load_module
from prunegraph.targets.triton.patterns import GatedMLP, gated_mlps
from prunegraph.targets.triton.prunepath import PrunePathFFN
from prunegraph.targets.triton.prunepath_decode import choose_decode_blocks
from prunegraph.targets.triton.swiglu import interpreting

__all__ = ["mlp_shapes", "install_triton_mlps", "install_prunepath_mlps", "uninstall",
           "unsupported", "own_forwards"]

_MARK = "_prunegraph_triton_forward"
_ACT_NAMES = ("act_fn", "act", "activation_fn", "activation")
_TRITON_DEVICES = ("cuda", "xpu")


def unsupported(mlp: GatedMLP) -> str | None:
    """Why the SwiGLU kernels cannot serve a gated MLP (None: they can)."""
    if mlp.module is None:
        return (f"{mlp.group or mlp.down}: {mlp.module_reason}, so no module's forward can be "
                f"swapped")
    if mlp.activation != "silu":
        return (f"{mlp.module}: activation {mlp.activation} is not SiLU; the Triton kernels "
                f"implement SwiGLU only")
    if mlp.bias:
        return f"{mlp.module}: a projection has a bias, which the Triton SwiGLU kernels do not add"
    return None


@contextlib.contextmanager
def _pytorch_forwards(model: nn.Module):
    """MLPs that run Triton kernels run their own forward meanwhile (so the model captures)."""
    swapped = [(m, m.__dict__["forward"]) for m in model.modules() if hasattr(m, _MARK)]
    for mlp, _ in swapped:
        previous = getattr(mlp, _MARK)
        if previous is None:
            del mlp.forward
        else:
            mlp.forward = previous
    try:
        yield
    finally:
        for mlp, forward in swapped:
            mlp.forward = forward


def own_forwards(model: nn.Module):
    """A context in which the MLPs that run Triton kernels run their own PyTorch forward (the
    masked routing path of a PrunePath model, for comparison); the kernels are back after it,
    without installing (or packing) them again."""
    return _pytorch_forwards(model)


def _resolve(model: nn.Module, mlps: Sequence[str | GatedMLP]) -> list[GatedMLP]:
    """Gated MLP patterns for ``mlps``; module paths are looked up in the model's graph."""
    by_path = None
    out = []
    for item in mlps:
        if isinstance(item, GatedMLP):
            out.append(item)
            continue
        try:
            if hasattr(model.get_submodule(item), _MARK):
                raise PreconditionError(f"{item} already runs Triton kernels; call uninstall "
                                        f"first")
        except AttributeError as e:
            raise PreconditionError(f"model has no submodule {item!r}: {e}") from e
        if by_path is None:
            with _pytorch_forwards(model):
                by_path = {m.module: m for m in gated_mlps(model).mlps if m.module is not None}
        if item not in by_path:
            raise PreconditionError(
                f"{item} is not a gated MLP (down(act(x @ Wg^T) * (x @ Wu^T)) alone in one "
                f"module); the model's are: {', '.join(by_path) or 'none'}. Pass only those")
        out.append(by_path[item])
    return out


def _check_silu(mlp: nn.Module, path: str, like: torch.Tensor) -> None:
    act = next((getattr(mlp, n) for n in _ACT_NAMES if hasattr(mlp, n)), None)
    if act is None:
        raise PreconditionError(f"{path}: no activation attribute ({', '.join(_ACT_NAMES)}); "
                                f"cannot check that it is SiLU")
    if like.device.type == "meta":
        raise PreconditionError(f"{path}: weights are on the meta device; load real weights")
    probe = torch.linspace(-6, 6, 25, device=like.device, dtype=torch.float32)
    try:
        ok = torch.allclose(act(probe), F.silu(probe), atol=1e-5)
    except Exception as e:  # an activation that cannot take a tensor is not SiLU
        raise PreconditionError(f"{path}: activation {act!r} could not be probed: {e}") from e
    if not ok:
        raise PreconditionError(f"{path}: activation {act!r} is not SiLU; the Triton kernels "
                                f"implement SwiGLU only, leave this MLP out of mlp_paths")


def mlp_shapes(model: nn.Module, mlp_paths: Sequence[str | GatedMLP]) -> list[MLPShape]:
    """The :class:`MLPShape` of each listed MLP (a module path or a found pattern), read from its
    live weights (for codegen)."""
    shapes = []
    for mlp in _resolve(model, mlp_paths):
        if mlp.module is None:
            raise PreconditionError(unsupported(mlp))
        wg = mlp.weight_reader(model.get_submodule(mlp.module))()[0]
        shapes.append(MLPShape(mlp.module, wg.shape[1], wg.shape[0], wg.dtype))
    return shapes


def _fallback_reason(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> str | None:
    """Why the kernels cannot take ``x`` with these weights (None: they can)."""
    if x.device.type not in _TRITON_DEVICES and not interpreting():
        return (f"input on {x.device.type}, which triton does not target "
                f"(set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)")
    if any(t.dtype != x.dtype for t in weights):
        return f"input dtype {x.dtype} differs from the weights' {weights[0].dtype}"
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in weights)):
        return "autograd needs a graph and the kernels have no backward"
    return None


def _warn_once(reason: str, warned: set[str]) -> None:
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"Triton MLPs fall back to PyTorch: {reason}", RuntimeWarning, stacklevel=3)


def _make_forward(run, weights, original, warned: set[str]):
    def forward(self, x, *args, **kwargs):
        w = weights()
        reason = _fallback_reason(x, w)
        if reason is not None:
            _warn_once(reason, warned)
            return original(x, *args, **kwargs)
        return run(x, *w)

    return forward


def _swap_forward(mlp: nn.Module, make) -> None:
    """Set ``mlp.forward = make(original)`` and remember what to restore (see uninstall)."""
    previous = mlp.__dict__.get("forward")  # an instance-level forward someone else set
    original = previous if previous is not None else type(mlp).forward.__get__(mlp)
    setattr(mlp, _MARK, previous)
    mlp.forward = types.MethodType(make(original), mlp)


def install_triton_mlps(model: nn.Module, mlp_paths: Sequence[str | GatedMLP],
                        module: types.ModuleType | str | Path) -> nn.Module:
    """Make each MLP in ``mlp_paths`` (module paths, or patterns from
    :func:`~prunegraph.targets.triton.patterns.gated_mlps`) run the generated launcher
    ``module.LAYERS[path]``.

    ``module`` is a module made by :mod:`~prunegraph.targets.triton.codegen` (or the path of
    its file). Every MLP is checked before any is changed. Returns ``model``.
    """
    if not isinstance(module, types.ModuleType):
        module = load_module(module)
    layers = getattr(module, "LAYERS", None)
    if not isinstance(layers, dict):
        raise PreconditionError(f"{module.__name__} has no LAYERS table; pass a module written "
                                f"by prunegraph.targets.triton.codegen")
    todo = []
    for pattern in _resolve(model, mlp_paths):
        reason = unsupported(pattern)
        if reason is not None:
            raise PreconditionError(f"{reason}; leave this MLP out of mlp_paths")
        path = pattern.module
        mlp = model.get_submodule(path)
        if hasattr(mlp, _MARK):
            raise PreconditionError(f"{path} already runs Triton kernels; call uninstall first")
        weights = pattern.weight_reader(mlp)
        gate, up, down = weights()
        entry = layers.get(path)
        if entry is None:
            raise PreconditionError(f"{module.__name__} has no launcher for {path!r}; generate "
                                    f"it with codegen from mlp_shapes(model, paths)")
        want = (entry["hidden"], entry["intermediate"], entry["dtype"])
        have = (gate.shape[1], gate.shape[0], gate.dtype)
        if want != have or tuple(down.shape) != have[:2] or up.shape != gate.shape:
            raise PreconditionError(
                f"{path}: the launcher was generated for (H, I, dtype) = {want} but the module "
                f"has {have}; regenerate the kernels for the current model")
        todo.append((mlp, entry["run"], weights))
    warned: set[str] = set()
    for mlp, run, weights in todo:
        _swap_forward(mlp, lambda original, run=run, w=weights: _make_forward(run, w, original,
                                                                             warned))
    return model


def _make_prunepath_forward(router, ffn: PrunePathFFN, max_grid_tokens: int, prefill: str,
                            original, warned: set[str], handle: int | None):
    def forward(self, x, *args, **kwargs):
        if prefill == "masked" and x.numel() // x.shape[-1] > max_grid_tokens:
            return original(x, *args, **kwargs)  # the module's own masked PyTorch forward
        reason = _fallback_reason(x, (router.weight, ffn.wg, ffn.wu, ffn.wd))
        if reason is not None:
            _warn_once(reason, warned)
            return original(x, *args, **kwargs)
        if handle is not None:  # one opaque operator node for torch.compile
            return torch.ops.prunegraph.prunepath_ffn(x, handle, router.tau,
                                                      router.mode == "inclusive")
        return ffn(x, router.tau, router.mode)

    return forward


def install_prunepath_mlps(model: nn.Module, *, max_grid_tokens: int = 16,
                           channels_per_program: int | None = None, pack: bool = True,
                           prefill: str = "grouped", dense_above: float | None = None,
                           as_op: bool = False) -> nn.Module:
    """Make every routed MLP of a PrunePath model (:mod:`prunegraph.passes.prunepath.router`) run the Triton
    PrunePath kernels (:class:`~prunegraph.targets.triton.prunepath.PrunePathFFN`): inputs of at
    most ``max_grid_tokens`` tokens (decode, small batches) the decode kernels, which stream the
    union of the tokens' active experts; larger inputs (prefill) the grouped prefill (tokens
    grouped by expert, one grouped gate/up GEMM, dense down), or, if ``dense_above`` is given,
    the masked path above that active fraction. ``prefill="masked"`` leaves larger inputs to the
    module's own masked PyTorch forward instead. Returns ``model``.

    ``tau`` and ``mode`` are read from each router at every call, so ``set_tau`` still works.
    The kernel paths do not update the routers' statistics (``active_fraction``); measure those
    on the PyTorch path. ``pack`` copies each ``down`` weight once into the column-major decode
    layout (a third of the FFN weights again in memory; without it the kernels read the live
    row-major weight through its strides, slower). ``channels_per_program`` (a power of two)
    overrides the channels of one decode gate/up unit. The weights are taken now: move or cast
    the model first, and install again after changing its weights. ``as_op`` calls each FFN
    through the custom operator of :mod:`~prunegraph.targets.triton.prunepath_op`, so that
    ``torch.compile`` of the whole model sees one node per FFN instead of breaking the graph.
    """
    if max_grid_tokens < 1:
        raise PreconditionError(f"max_grid_tokens must be >= 1, got {max_grid_tokens}")
    if prefill not in ("grouped", "masked"):
        raise PreconditionError(f"prefill must be 'grouped' or 'masked', got {prefill!r}")
    if channels_per_program is not None and (channels_per_program < 1 or channels_per_program
                                             & (channels_per_program - 1)):
        raise PreconditionError(f"channels_per_program must be a power of two, got "
                                f"{channels_per_program}")
    layers = pp.kernel_weights(model)  # raises unless routed SwiGLU MLPs are installed
    todo = []
    for w, router in zip(layers, pp.routers(model)):
        mlp = model.get_submodule(w["mlp"])
        if hasattr(mlp, _MARK):
            raise PreconditionError(f"{w['mlp']} already runs Triton kernels; call uninstall "
                                    f"first")
        _check_silu(mlp, w["mlp"], w["wg"])
        I, H = w["wg"].shape
        G = w["group_size"]
        overrides = {} if channels_per_program is None else {"gu_c": channels_per_program}
        blocks = choose_decode_blocks(H, I, G, -(-I // G), w["wg"].device, **overrides)
        ffn = PrunePathFFN(router.weight, w["wg"], w["wu"], w["wd"], G,
                           max_decode_tokens=max_grid_tokens, dense_above=dense_above,
                           decode_blocks=blocks, pack=pack)
        todo.append((mlp, router, ffn))
    warned: set[str] = set()
    if as_op:
        from prunegraph.targets.triton.prunepath_op import register
    for mlp, router, ffn in todo:
        handle = register(ffn) if as_op else None
        _swap_forward(mlp, lambda original, r=router, f=ffn, h=handle: _make_prunepath_forward(
            r, f, max_grid_tokens, prefill, original, warned, h))
    return model


def uninstall(model: nn.Module, mlp_paths: Sequence[str] | None = None) -> nn.Module:
    """Restore the forward of the listed MLPs (default: every MLP that runs Triton kernels,
    from either installer)."""
    mlps = ([model.get_submodule(p) for p in mlp_paths] if mlp_paths is not None
            else [m for m in model.modules() if hasattr(m, _MARK)])
    for mlp in mlps:
        if not hasattr(mlp, _MARK):
            continue
        previous = getattr(mlp, _MARK)
        delattr(mlp, _MARK)
        if previous is None:
            del mlp.forward
        else:
            mlp.forward = previous
    return model
