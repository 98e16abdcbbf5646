"""Swap SwiGLU MLP modules' forward for Triton kernels, and back.

Two installers share :func:`uninstall`: :func:`install_triton_mlps` (dense or pruned MLPs, the
generated fused SwiGLU launchers) and :func:`install_prunepath_mlps` (a PrunePath model's routed
MLPs, the top-p expert kernels of :mod:`~prunegraph.targets.triton.prunepath`).

For :func:`install_triton_mlps` an MLP qualifies when it has ``gate_proj``, ``up_proj`` and
``down_proj`` ``nn.Linear`` children without bias and a SiLU activation (checked numerically, so
any SiLU class passes) and its forward is ``down(act(gate(x)) * up(x))``; the caller names the
modules by path. :func:`install_prunepath_mlps` finds the gate, up and down weights from the
routers' MoEfy layout (fused ``gate_up_proj`` too), so nothing here knows an architecture.
Either installed forward falls back to the module's own forward, with one warning per reason,
when the kernels cannot run: the input is on a device triton does not target (anything but
CUDA/ROCm/XPU, unless ``TRITON_INTERPRET=1``), its dtype differs from the weights', or autograd
needs a graph (the kernels have no backward).
"""

from __future__ import annotations

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
from prunegraph.targets.triton.prunepath import prunepath_ffn
from prunegraph.targets.triton.swiglu import interpreting

__all__ = ["mlp_shapes", "install_triton_mlps", "install_prunepath_mlps", "uninstall"]

_MARK = "_prunegraph_triton_forward"
_ACT_NAMES = ("act_fn", "act", "activation_fn", "activation")
_TRITON_DEVICES = ("cuda", "xpu")


def _linears(mlp: nn.Module, path: str) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    out = []
    for attr in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, attr, None)
        if not isinstance(lin, nn.Linear):
            raise PreconditionError(
                f"{path}: expected an nn.Linear child {attr!r} (SwiGLU MLP with gate_proj, "
                f"up_proj, down_proj); found {type(lin).__name__}. Pass only such MLP paths")
        if lin.bias is not None:
            raise PreconditionError(f"{path}.{attr} has a bias, which the Triton SwiGLU kernels "
                                    f"do not add; leave this MLP out of mlp_paths")
        out.append(lin)
    return out[0], out[1], out[2]


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


def mlp_shapes(model: nn.Module, mlp_paths: Sequence[str]) -> list[MLPShape]:
    """The :class:`MLPShape` of each listed MLP, read from its live weights (for codegen)."""
    shapes = []
    for path in mlp_paths:
        gate, _, _ = _linears(model.get_submodule(path), path)
        shapes.append(MLPShape(path, gate.in_features, gate.out_features, gate.weight.dtype))
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


def _make_forward(run, original, warned: set[str]):
    def forward(self, x, *args, **kwargs):
        w = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
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


def install_triton_mlps(model: nn.Module, mlp_paths: Sequence[str],
                        module: types.ModuleType | str | Path) -> nn.Module:
    """Make each MLP in ``mlp_paths`` run the generated launcher ``module.LAYERS[path]``.

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
    for path in mlp_paths:
        try:
            mlp = model.get_submodule(path)
        except AttributeError as e:
            raise PreconditionError(f"model has no submodule {path!r}: {e}") from e
        if hasattr(mlp, _MARK):
            raise PreconditionError(f"{path} already runs Triton kernels; call uninstall first")
        gate, up, down = _linears(mlp, path)
        _check_silu(mlp, path, gate.weight)
        entry = layers.get(path)
        if entry is None:
            raise PreconditionError(f"{module.__name__} has no launcher for {path!r}; generate "
                                    f"it with codegen from mlp_shapes(model, paths)")
        want = (entry["hidden"], entry["intermediate"], entry["dtype"])
        have = (gate.in_features, gate.out_features, gate.weight.dtype)
        if (want != have or tuple(down.weight.shape) != have[:2]
                or up.weight.shape != gate.weight.shape):
            raise PreconditionError(
                f"{path}: the launcher was generated for (H, I, dtype) = {want} but the module "
                f"has {have}; regenerate the kernels for the current model")
        todo.append((mlp, entry["run"]))
    warned: set[str] = set()
    for mlp, run in todo:
        _swap_forward(mlp, lambda original, run=run: _make_forward(run, original, warned))
    return model


def _make_prunepath_forward(router, wg, wu, wd, max_grid_tokens: int,
                            channels_per_program: int, original, warned: set[str]):
    def forward(self, x, *args, **kwargs):
        if x.numel() // x.shape[-1] > max_grid_tokens:
            return original(x, *args, **kwargs)  # prefill: the documented masked PyTorch path
        reason = _fallback_reason(x, (router.weight, wg, wu, wd))
        if reason is not None:
            _warn_once(reason, warned)
            return original(x, *args, **kwargs)
        return prunepath_ffn(x, router.weight, wg, wu, wd, router.tau, router.group_size,
                             router.mode, max_grid_tokens=max_grid_tokens,
                             channels_per_program=channels_per_program)

    return forward


def install_prunepath_mlps(model: nn.Module, *, max_grid_tokens: int = 16,
                           channels_per_program: int = 4, pack: bool = True) -> nn.Module:
    """Make every routed MLP of a PrunePath model (``prunegraph.passes.prunepath.router``) run the Triton
    router and expert kernels for inputs of at most ``max_grid_tokens`` tokens (decode, small
    batches); larger inputs (prefill) run the module's own dense masked PyTorch forward, since
    the grid path streams each token's experts separately. Returns ``model``.

    ``tau`` and ``mode`` are read from each router at every call, so ``set_tau`` still works.
    The kernel path does not update the routers' statistics (``active_fraction``); measure those
    on the PyTorch path. ``pack`` copies each ``down`` weight once into the column-major decode
    layout (a third of the FFN weights again in memory; without it the kernels read the live
    row-major weight through its strides, slower). The weights are taken now: move or cast the
    model first, and install again after changing its weights.
    """
    if max_grid_tokens < 1:
        raise PreconditionError(f"max_grid_tokens must be >= 1, got {max_grid_tokens}")
    layers = pp.kernel_weights(model)  # raises unless routed SwiGLU MLPs are installed
    todo = []
    for w, router in zip(layers, pp.routers(model)):
        mlp = model.get_submodule(w["mlp"])
        if hasattr(mlp, _MARK):
            raise PreconditionError(f"{w['mlp']} already runs Triton kernels; call uninstall "
                                    f"first")
        _check_silu(mlp, w["mlp"], w["wg"])
        wd = w["wd"].t().contiguous().t() if pack else w["wd"]
        todo.append((mlp, router, w["wg"], w["wu"], wd))
    warned: set[str] = set()
    for mlp, router, wg, wu, wd in todo:
        _swap_forward(mlp, lambda original, r=router, g=wg, u=wu, d=wd: _make_prunepath_forward(
            r, g, u, d, max_grid_tokens, channels_per_program, original, warned))
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
