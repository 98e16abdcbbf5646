"""Calibration statistics for one-shot importance: input feature norms and Taylor saliency.

Both run the user's module on calibration token blocks and leave it exactly as they found it:
hooks are removed, ``requires_grad`` flags, existing ``.grad`` tensors and the train/eval mode
are restored, even when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from prunegraph.plan.gating import linear_input_dim

__all__ = ["input_norms", "taylor_saliency", "batches", "linear_owners"]


def batches(blocks: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator:
    """Consecutive batches of ``blocks``, with a progress bar when asked."""
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for i in starts:
        yield blocks[i:i + batch_size]


def sum_input_squares(modules: Iterable[nn.Module]) -> tuple[dict[int, torch.Tensor], list]:
    """Forward hooks adding up each module's squared input features over every token it sees
    (``sq[id(module)]``, float32 ``[in]``); remove the returned handles when done."""
    sq: dict[int, torch.Tensor] = {}

    def hook(mod, args, _out):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        s = (x * x).sum(0)
        sq[id(mod)] = sq[id(mod)] + s if id(mod) in sq else s

    return sq, [mod.register_forward_hook(hook) for mod in modules]


def linear_owners(model: nn.Module, names) -> dict[str, tuple[str, nn.Module]]:
    """``param name -> (weight|bias, owning linear module)`` for names a linear module owns."""
    out = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if linear_input_dim(mod) is not None and attr in ("weight", "bias"):
            out[name] = (attr, mod)
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def input_norms(model: nn.Module, params: Mapping[str, nn.Parameter], blocks: torch.Tensor,
                batch_size: int, progress: bool):
    """``||X_j||_2`` over all calibration tokens for every linear module owning a parameter.

    Returns ``(norms, tokens, forwards)``: ``norms[weight name]`` holds ``||X_j||`` shaped to
    broadcast against the weight (``[1, in]`` for ``nn.Linear``, ``[in, 1]`` for ``Conv1D``),
    ``norms[bias name]`` is ``sqrt(tokens)`` (a bias multiplies the constant input 1). Parameters
    of other modules, or of modules the forward never reached, are absent.
    """
    owners = linear_owners(model, params)
    modules = {id(mod): mod for _, mod in owners.values()}
    sq, handles = sum_input_squares(modules.values())
    tokens = forwards = 0
    device = _device(model)
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches(blocks, batch_size, progress, "wanda"):
                model(input_ids=batch.to(device))
                tokens += batch.numel()
                forwards += 1
    finally:
        for h in handles:
            h.remove()
    norms = {}
    for name, (attr, mod) in owners.items():
        if attr == "bias":
            norms[name] = torch.tensor(float(tokens)).sqrt()
        elif id(mod) in sq:  # a module the forward never reached has no statistics
            shape = [1, 1]
            shape[linear_input_dim(mod)] = -1
            norms[name] = sq[id(mod)].sqrt().cpu().reshape(shape)
    return norms, tokens, forwards


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on ``batch`` (computed here, not by HF)."""
    logits = model(input_ids=batch).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def taylor_saliency(model: nn.Module, params: Mapping[str, nn.Parameter], blocks: torch.Tensor,
                    batch_size: int, progress: bool):
    """``|W * dL/dW|`` per weight, ``L`` the mean next-token CE over every calibration token.

    Only the named parameters get gradients. Returns ``(saliency, tokens, forwards)``.
    """
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    old_grads = {name: p.grad for name, p in params.items()}
    device = _device(model)
    n_pred = blocks.shape[0] * (blocks.shape[1] - 1)
    tokens = forwards = 0
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with _eval_mode(model), torch.enable_grad():
            for batch in batches(blocks, batch_size, progress, "taylor"):
                batch = batch.to(device)
                loss = next_token_loss(model, batch)
                (loss * (batch.shape[0] * (batch.shape[1] - 1) / n_pred)).backward()
                tokens += batch.numel()
                forwards += 1
        saliency = {}
        for name, p in params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            saliency[name] = (p.detach().float() * g.float()).abs()
    finally:
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)
        for name, p in params.items():
            p.grad = old_grads[name]
    return saliency, tokens, forwards
