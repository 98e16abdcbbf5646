"""The mask maths of weight pruning: scores, per-row / per-layer / N:M selection, exact top-k.

Every function returns a bool *keep* mask (``True`` = kept) shaped like the weight. Scores are
compared where the methods compare them:

* :func:`keep_unstructured` with ``comparison="row"``: each output (a row of ``nn.Linear``'s
  ``[out, in]``; a column of ``Conv1D``'s ``[in, out]``) keeps ``n_in - round(sparsity * n_in)``
  of its weights, the Wanda paper's comparison group; ``"layer"``: one ranking over the whole
  weight (magnitude pruning as in the SparseGPT and Wanda baselines).
* :func:`keep_nm`: in every group of ``m`` consecutive weights along the input dim keep the ``n``
  largest (2:4: the pattern sparse tensor cores run).
* :func:`global_topk`: keep exactly ``k`` weights over many tensors at once (LEAP's final mask)
  without concatenating them: a two-pass radix select on an order-preserving integer key of the
  scores finds the exact threshold, ties at the threshold are broken by a second score
  (``tiebreak``, e.g. ``|W|``) and then by position. Memory stays at one tensor's worth of
  temporaries, so it works over the 7B weights of an 8B model.

Ties elsewhere go to the lower index (stable sorts), so every result is deterministic.

Worked example (Wanda, one row, 50%)::

    W = [[1., -2., 3., -4.]], ||X_j|| = [4., 3., 2., 1.]
    wanda_scores(W, norms, 1)      -> [[4., 6., 6., 4.]]
    keep_unstructured(s, 0.5, 1)   -> [[False, True, True, False]]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prunegraph.errors import SpecError

__all__ = ["magnitude_scores", "wanda_scores", "keep_unstructured", "keep_nm", "global_topk",
           "topk_threshold", "ordered_key"]

_CHUNK = 1 << 24


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Wanda), ``norms`` a 1-D tensor over the input features."""
    norms = norms.reshape(-1).float().to(weight.device)
    if norms.numel() != weight.shape[in_dim]:
        raise SpecError(f"input norms have {norms.numel()} entries for a weight with "
                        f"{weight.shape[in_dim]} inputs")
    shape = [1, 1]
    shape[in_dim] = -1
    return weight.detach().float().abs() * norms.reshape(shape)


def _keep_top(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries along ``dim`` (ties to the lower index)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    order = torch.argsort(scores, dim=dim, descending=True, stable=True)
    return keep.scatter_(dim, order.narrow(dim, 0, min(k, scores.shape[dim])), True)


def keep_unstructured(scores: torch.Tensor, sparsity: float, in_dim: int,
                      comparison: str = "row") -> torch.Tensor:
    """Keep all but ``round(sparsity * n)`` weights, ranked per output row or per layer."""
    if not 0.0 <= sparsity < 1.0:
        raise SpecError(f"sparsity must lie in [0, 1), got {sparsity}")
    if comparison == "row":
        n = scores.shape[in_dim]
        return _keep_top(scores, n - round(sparsity * n), in_dim)
    if comparison == "layer":
        flat = scores.reshape(-1)
        return _keep_top(flat, flat.numel() - round(sparsity * flat.numel()), 0).view_as(scores)
    raise SpecError(f"comparison must be 'row' or 'layer', got {comparison!r}")


def keep_nm(scores: torch.Tensor, n: int, m: int, in_dim: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dim."""
    if scores.shape[in_dim] % m:
        raise SpecError(f"the {n}:{m} pattern needs the input dim ({scores.shape[in_dim]}) to be "
                        f"a multiple of {m}; leave this weight dense with a skip pattern")
    s = scores.movedim(in_dim, -1)
    grouped = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
    keep = _keep_top(grouped, n, -1)
    return keep.reshape(s.shape).movedim(-1, in_dim)


# ------------------------------------------------------------------------ exact global top-k


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """An int32 key with the same order as ``x``'s float32 values (NaN refused)."""
    x = x.detach().float().contiguous()
    if torch.isnan(x).any():
        raise SpecError("scores contain NaN; the masks cannot be ranked")
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _chunks(t: torch.Tensor):
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i:i + _CHUNK]


def _histogram(tensors, bin_of) -> torch.Tensor:
    hist = None
    for t in tensors:
        for c in _chunks(t):
            bins = bin_of(ordered_key(c))
            if bins is None or bins.numel() == 0:
                continue
            h = torch.bincount(bins.long(), minlength=65536)
            hist = h if hist is None else hist + h.to(hist.device)
    if hist is None:
        hist = torch.zeros(65536, dtype=torch.long)
    return hist.cpu()


def _crossing(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Largest bin ``b`` with ``count(bins >= b) >= k``, and ``count(bins > b)``."""
    from_top = hist.flip(0).cumsum(0).flip(0)
    b = int((from_top >= k).nonzero().max())
    above = int(from_top[b + 1]) if b + 1 < hist.numel() else 0
    return b, above


def topk_threshold(tensors, k: int) -> tuple[int, int]:
    """``(t, above)``: the int32 key ``t`` of the ``k``-th largest value over ``tensors`` and the
    number of values strictly above it (``above < k <= above + count(key == t)``)."""
    total = sum(t.numel() for t in tensors)
    if not 0 < k <= total:
        raise SpecError(f"top-k needs 0 < k <= {total} values, got k={k}")
    high = _histogram(tensors, lambda key: (key >> 16) + 32768)
    b, above = _crossing(high, k)
    hb = b - 32768
    low = _histogram(tensors, lambda key: (key[(key >> 16) == hb] & 0xFFFF))
    lb, above_low = _crossing(low, k - above)
    return hb * 65536 + lb, above + above_low


def global_topk(scores: Mapping[str, torch.Tensor], k: int,
                tiebreak: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep masks holding exactly the ``k`` largest scores over all tensors (see module doc)."""
    names = list(scores)
    if k == sum(scores[n].numel() for n in names):
        return {n: torch.ones_like(scores[n], dtype=torch.bool) for n in names}
    if k == 0:
        return {n: torch.zeros_like(scores[n], dtype=torch.bool) for n in names}
    t, above = topk_threshold([scores[n] for n in names], k)
    need = k - above
    keep, ties = {}, {}
    for n in names:
        key = ordered_key(scores[n])
        keep[n] = key > t
        ties[n] = key == t
    # the `need` ties to keep: by tiebreak (descending), then by position
    parts = []
    for n in names:
        idx = ties[n].reshape(-1).nonzero().reshape(-1)
        if idx.numel():
            second = (tiebreak[n].reshape(-1)[idx].float() if tiebreak is not None
                      else torch.zeros(idx.numel(), device=idx.device))
            parts.append((n, idx, second))
    second = torch.cat([p[2].cpu() for p in parts])
    chosen = torch.argsort(second, descending=True, stable=True)[:need]
    picked = torch.zeros(second.numel(), dtype=torch.bool)
    picked[chosen] = True
    offset = 0
    for n, idx, _ in parts:
        sel = picked[offset:offset + idx.numel()].to(idx.device)
        keep[n].view(-1)[idx[sel]] = True
        offset += idx.numel()
    return keep
