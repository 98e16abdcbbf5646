"""Distillation losses beyond the loop's logit KL: the hidden-state term.

The logit term is the training loop's :func:`~prunegraph.passes.train.loop.kd_loss`
(``T² · KL(softmax(t/T) || softmax(s/T))``). The hidden-state term compares the student's and the
teacher's residual stream after every decoder layer where their widths match (a slice that keeps
the hidden size keeps every layer comparable)::

    hidden_loss = mean over matching layers l of  mean((h_s[l] - h_t[l])²) / mean(h_t[l]²)

Dividing by the teacher's mean square makes every layer count alike whatever the scale of its
residual stream (it grows with depth in Llama-style models), and makes the term scale-free, so
one ``hidden_weight`` suits every model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunegraph.passes.train.loop import kd_loss

__all__ = ["kd_loss", "hidden_loss", "matching_layers"]


def matching_layers(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
                    ) -> list[int]:
    """Indices of the hidden states (``output_hidden_states``, the embeddings at 0 left out)
    whose shapes agree between student and teacher."""
    if len(student) != len(teacher):
        return []
    return [i for i in range(1, len(student)) if student[i].shape == teacher[i].shape]


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                layers: Sequence[int]) -> torch.Tensor:
    """The normalised hidden-state MSE over ``layers`` (see the module docstring)."""
    if not layers:
        raise ValueError("hidden_loss needs at least one layer whose widths match")
    terms = []
    for i in layers:
        s, t = student[i].float(), teacher[i].float()
        terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()
