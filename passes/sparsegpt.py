"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with layer-wise OBS weight updates.

For one linear with weight ``W`` (``[out, in]``) and calibration inputs ``X`` (``[tokens, in]``)
SparseGPT looks for a masked ``W'`` with a small reconstruction error ``||X W'^T - X W^T||^2``.
With ``H = X^T X`` (damped by ``percdamp * mean(diag H)``) it walks the input columns left to
right; pruning column ``i`` of a row costs ``w_i^2 / [H^-1]_ii`` and the optimal compensation
spreads ``(w_i - q_i) / [H^-1]_ii * [H^-1]_{i, i:}`` over the columns not yet visited, where
``H^-1`` is the inverse of the Hessian restricted to those columns: the rows of the upper
Cholesky factor of ``H^-1`` give them all. Updates are applied lazily per block of
``blocksize`` columns (the same numbers, fewer large matmuls).

* Unstructured: within each block the ``sparsity`` fraction of weights with the lowest
  ``w^2 / [H^-1]_jj^2`` is pruned (the paper's adaptive mask selection), chosen when the block
  starts.
* ``N:M``: every group of ``m`` columns, when reached, prunes the ``m - n`` weights of each row
  with the lowest ``w^2 / [H^-1]_jj^2``.
* A fixed ``keep`` mask skips the selection and only reconstructs.

With a mask whose pruned columns form a prefix of each row the walk is exact: the result is the
least-squares optimum ``argmin (W' - W) H (W' - W)^T`` over weights zero on the mask (the test
checks this against a direct solve).
"""

from __future__ import annotations

import torch

from prunegraph.errors import PrunegraphError, SpecError

__all__ = ["sparsegpt_prune", "HessianAccumulator"]


class HessianAccumulator:
    """``H = 2/n * sum_t x_t x_t^T`` over every calibration token seen (float32)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.H += x.t() @ x


def _inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1``."""
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H = H.clone()
    H[idx, idx] += damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
        raise PrunegraphError(f"SparseGPT: the damped Hessian is not positive definite ({e}); "
                              f"raise percdamp or use more calibration tokens") from e


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, keep: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``[out, in]``) against Hessian ``H`` (``[in, in]``); returns the updated
    weight (float32, zeros where pruned) and the keep mask. See the module docstring."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise SpecError(f"Hessian of shape {tuple(H.shape)} for a weight with {cols} inputs")
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise SpecError(f"SparseGPT {nm[0]}:{nm[1]} needs blocksize ({blocksize}) and the input "
                        f"dim ({cols}) to be multiples of {nm[1]}")
    if keep is not None and tuple(keep.shape) != (rows, cols):
        raise SpecError(f"keep mask of shape {tuple(keep.shape)} for a weight {(rows, cols)}")
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_factor(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if keep is not None:
            mask1 = ~keep[:, i1:i2].to(W.device)
        elif nm is None:
            score = W1 ** 2 / d.reshape(1, -1) ** 2
            n_prune = round(score.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if n_prune:
                order = torch.argsort(score.reshape(-1), stable=True)[:n_prune]
                mask1.view(-1)[order] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if nm is not None and keep is None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                low = torch.argsort(score, dim=1, stable=True)[:, :m - n]
                mask1.scatter_(1, i + low, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned
