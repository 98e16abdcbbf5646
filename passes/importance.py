"""One-shot importance scores: magnitude, Wanda and first-order Taylor, per unit of every group.

A score is computed over *every member* of a group, not over one layer: a MLP channel's score sums
its ``gate_proj`` and ``up_proj`` rows and its ``down_proj`` column; a query head's score sums its
``q_proj`` rows, its ``o_proj`` columns and its share of the ``k_proj``/``v_proj`` rows.

Every criterion first gives a per-weight score tensor ``e`` of the member's shape, then reduces it
to units with :func:`unit_sums` (the unit's slice, see :class:`prunegraph.ir.groups.Member`):

* ``magnitude``: ``e = W**2``; the unit score is the group L2 norm ``sqrt(sum_members sum_slice e)``.
* ``wanda``: ``e = |W_ij| * ||X_j||_2`` (Sun et al. 2023), ``X_j`` the ``j``-th input feature of the
  ``nn.Linear`` (or GPT-2's ``Conv1D``) owning ``W``, its norm taken over every calibration token.
  Rows (producer members) therefore weigh every input feature of the matrix; columns (consumer
  members) weigh exactly the unit's own channels. A bias is a weight on the constant input 1:
  ``e = |b_i| * sqrt(tokens)``.
  Parameters not owned by an ``nn.Linear`` (fused 3-D expert tensors used in a custom op, raw
  router weights, norms, embeddings) have no input statistics. A group with such a member is
  scored with ``||X|| = 1`` for *all* its members (activation-free ``|W|``, i.e. L1 magnitude), so
  that the members of one group stay on one scale; ``scores.stats["wanda_fallback"]`` lists those
  groups and the parameters that caused it.
* ``taylor``: ``e = |W * dL/dW|`` with ``L`` the mean next-token cross-entropy over all calibration
  tokens (gradients accumulated over batches, weighted by batch size, so the result does not
  depend on ``batch_size``): LLM-Pruner's element-wise first-order Taylor.

Shared slices (``div > 1``: a kv head serves ``div`` query heads) are split evenly: each of the
``div`` units gets ``1/div`` of the slice's summed ``e`` (for magnitude, of its squared sum).

Example::

    scores = score_groups(model, groups, "wanda", blocks=token_blocks(tok, docs, 128, 32))
    scores["model.layers.3.mlp:channels"]        # Tensor[1536]
    scores["model.layers.3.mlp.experts:expert_channels"]   # Tensor[experts, 768]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunegraph.errors import PreconditionError, SpecError, nearest
from prunegraph.ir.groups import Group, Member

__all__ = ["CRITERIA", "Scores", "score_groups", "unit_sums", "member_params",
           "sum_member_scores"]

CRITERIA = ("magnitude", "wanda", "taylor")


class Scores(dict):
    """``group name -> per-unit scores`` (``Tensor[size]`` or ``Tensor[experts, size]``).

    ``stats`` records how they were computed (criterion, tokens seen, forwards run, fallbacks).
    """

    def __init__(self, *args, stats: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: dict = dict(stats or {})


def check_criterion(criterion: str) -> None:
    """Raise :class:`SpecError` naming the valid criteria when ``criterion`` is unknown."""
    if criterion not in CRITERIA:
        hint = nearest(str(criterion), CRITERIA)
        raise SpecError(
            f"unknown importance criterion '{criterion}'; choose one of {', '.join(CRITERIA)}.{hint}"
        )


def member_params(model: nn.Module, groups: Iterable[Group]) -> dict[str, nn.Parameter]:
    """The parameters the groups' members name; every missing name is listed before raising."""
    named = dict(model.named_parameters(remove_duplicate=False))
    wanted = {m.param for g in groups for m in g.members}
    missing = sorted(wanted - named.keys())
    if missing:
        raise PreconditionError(
            f"{len(missing)} group member(s) name parameters the model does not have: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The groups belong to "
            "another model: re-run the analysis on this one."
        )
    return {name: named[name] for name in sorted(wanted)}


def unit_sums(member: Member, size: int, elem: torch.Tensor) -> torch.Tensor:
    """Sum of ``elem`` (a per-weight score of the member's parameter) over each unit's slice.

    Returns ``Tensor[size]``, or ``Tensor[experts, size]`` when the member has an ``expert_dim``.
    A block shared by ``div`` units is split evenly between them.
    """
    keep = [member.dim] if member.expert_dim is None else sorted((member.dim, member.expert_dim))
    other = [d for d in range(elem.dim()) if d not in keep]
    v = elem.sum(dim=other) if other else elem
    if member.expert_dim is None:
        v = v[None]
    elif member.expert_dim > member.dim:
        v = v.transpose(0, 1)
    idx = member.block_positions(size).to(v.device)
    per_block = v[:, idx].sum(-1)
    per_unit = per_block[:, torch.arange(size, device=v.device) // member.div] / member.div
    return per_unit if member.expert_dim is not None else per_unit[0]


def score_groups(model: nn.Module, groups: Iterable[Group], criterion: str = "wanda",
                 blocks: torch.Tensor | None = None, batch_size: int = 4,
                 progress: bool = True) -> Scores:
    """Per-unit importance of every prunable group (pinned groups are skipped).

    Args:
        model: the user's module (left unchanged: no hook, gradient or ``requires_grad`` survives).
        groups: groups of this model (``prunegraph.ir.analysis.analyze(model).groups``).
        criterion: ``magnitude``, ``wanda`` or ``taylor`` (see the module docstring).
        blocks: ``LongTensor[n, block_len]`` of calibration token ids; needed by wanda and taylor.
        batch_size: blocks per forward.
        progress: show a progress bar over calibration batches.

    Returns:
        :class:`Scores`: ``name -> Tensor[size]`` (``Tensor[experts, size]`` for per-expert
        channel groups), float32 on the CPU, with ``stats``.
    """
    check_criterion(criterion)
    groups = [g for g in groups if g.prunable]
    if criterion != "magnitude" and (blocks is None or blocks.numel() == 0):
        raise PreconditionError(
            f"criterion '{criterion}' needs calibration token blocks; pass blocks="
            "prunegraph.data.text.token_blocks(tokenizer, docs, block_len, n_blocks), or use "
            "criterion='magnitude', which needs none."
        )
    if batch_size < 1:
        raise SpecError(f"batch_size must be >= 1, got {batch_size}")
    params = member_params(model, groups)
    stats: dict = {"criterion": criterion, "groups": len(groups), "forwards": 0, "tokens": 0}

    if criterion == "magnitude":
        elem = {n: p.detach().float() ** 2 for n, p in params.items()}
        return _reduce(groups, elem, sqrt=True, stats=stats)

    blocks = torch.as_tensor(blocks, dtype=torch.long)
    if criterion == "wanda":
        from prunegraph.passes._calibration import input_norms

        norms, tokens, forwards = input_norms(model, params, blocks, batch_size, progress)
        stats.update(tokens=tokens, forwards=forwards)
        elem, fallback = _wanda_elements(groups, params, norms)
        stats["wanda_fallback"] = fallback
        return _reduce(groups, elem, sqrt=False, stats=stats)

    from prunegraph.passes._calibration import taylor_saliency

    elem, tokens, forwards = taylor_saliency(model, params, blocks, batch_size, progress)
    stats.update(tokens=tokens, forwards=forwards)
    return _reduce(groups, elem, sqrt=False, stats=stats)


def _wanda_elements(groups: list[Group], params: Mapping[str, nn.Parameter],
                    norms: Mapping[str, torch.Tensor]):
    """Per-weight Wanda scores per group, and ``{group: [params without input statistics]}``."""
    fallback = {g.name: sorted({m.param for m in g.members if m.param not in norms})
                for g in groups}
    fallback = {name: lacking for name, lacking in fallback.items() if lacking}
    plain = {n: p.detach().float().abs() for n, p in params.items()}
    wanda = {n: plain[n] * norms[n].to(plain[n].device) for n in params if n in norms}

    def get(group: Group, param: str) -> torch.Tensor:
        return plain[param] if group.name in fallback else wanda[param]

    return get, fallback


def _reduce(groups: list[Group], elem, sqrt: bool, stats: dict) -> Scores:
    """Sum the per-weight scores over every member's unit slices; ``sqrt`` for the L2 norm."""
    get = elem if callable(elem) else (lambda g, name: elem[name])
    contrib = {(g.name, j): unit_sums(m, g.size, get(g, m.param)).float().cpu()
               for g in groups for j, m in enumerate(g.members)}
    return sum_member_scores(groups, contrib, sqrt, stats)


def sum_member_scores(groups: list[Group], contrib: Mapping[tuple[str, int], torch.Tensor],
                      sqrt: bool, stats: dict) -> Scores:
    """Each group's score: its members' unit sums ``contrib[(group, member index)]`` added in
    member order (the in-memory and the sequential path share it, so they agree exactly)."""
    out = Scores(stats=stats)
    for g in groups:
        total = torch.zeros(g.size)
        for j in range(len(g.members)):
            s = contrib[(g.name, j)]
            total = total + s if total.dim() >= s.dim() else s + total
        out[g.name] = total.sqrt() if sqrt else total
    return out
