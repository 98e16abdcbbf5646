"""Small random language models built from the ops the analysis has rules for.

Each *block* maps the residual stream ``[batch, seq, hidden]`` to itself and exercises a few op
rules on a space that a wrong rule would make prunable (an up projection, the op, a down
projection). :class:`RandomLM` stacks blocks between an embedding and a head. The property test
(``test_random_graphs.py``) analyses such models and checks, for every group found, that
zeroing its units at the gate site equals zeroing them in every member.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401  (registers transformers' grouped_mm op)
from torch import nn

VOCAB = 32


class RandomLM(nn.Module):
    """``head(x + block_1(x) + ...)`` over token embeddings, no norm (so hidden can be free)."""

    def __init__(self, hidden: int, blocks: list[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class _Block(nn.Module):
    """A residual block; ``VARIANTS`` name the forms it can take (``kind``)."""

    VARIANTS: tuple[str, ...] = ("",)

    def __init__(self, hidden: int, rng: random.Random, kind: str | None = None):
        super().__init__()
        self.hidden = hidden
        self.kind = kind if kind is not None else rng.choice(self.VARIANTS)


def _inner(rng: random.Random, multiple: int = 2) -> int:
    return multiple * rng.randint(2, 6)


# ---- pointwise, splits, concatenation ------------------------------------------------------
class Act(_Block):
    """up -> an activation (exact rules and the pointwise family) -> down."""

    VARIANTS = ("silu", "gelu", "relu", "tanh", "sigmoid", "square", "softplus", "abs",
                "expclamp", "sin", "erf", "hardswish", "mish", "log1pabs", "glu", "prelu",
                "logsigmoid", "multiply", "where")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i // 2 if self.kind == "glu" else i, hidden)
        self.prelu = nn.PReLU(i, init=0.1) if self.kind == "prelu" else None

    def forward(self, x):
        h = self.up(x)
        a = self.kind
        if a == "glu":
            h = F.glu(h, -1)
        elif a == "prelu":
            h = self.prelu(h.transpose(1, 2)).transpose(1, 2)
        elif a == "square":
            h = torch.square(h)
        elif a == "expclamp":
            h = torch.exp(h.clamp(max=2.0))
        elif a == "log1pabs":
            h = torch.log1p(h.abs())
        elif a == "logsigmoid":
            h = F.logsigmoid(h)
        elif a == "multiply":
            h = torch.multiply(h, torch.sigmoid(h))
        elif a == "where":
            h = torch.where(h > 0, h, 0.5)
        elif a in ("softplus", "hardswish", "mish", "silu", "gelu", "relu"):
            h = getattr(F, a)(h)
        else:
            h = getattr(torch, a)(h)
        return self.down(h)


class Glu(_Block):
    """Fused gate/up projection cut by chunk or split, product, down."""

    VARIANTS = ("split", "chunk")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.gate_up = nn.Linear(hidden, 2 * self.i, bias=False)
        self.down = nn.Linear(self.i, hidden, bias=False)

    def forward(self, x):
        h = self.gate_up(x)
        g, u = h.split([self.i, self.i], -1) if self.kind == "split" else h.chunk(2, -1)
        return self.down(F.silu(g) * u)


class CatTwo(_Block):
    """Two projections concatenated (cat defines a segmented space), then one down."""

    VARIANTS = ("cat", "concatenate")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.a, self.b = nn.Linear(hidden, _inner(rng)), nn.Linear(hidden, _inner(rng))
        self.down = nn.Linear(self.a.out_features + self.b.out_features, hidden)

    def forward(self, x):
        cat = torch.concatenate if self.kind == "concatenate" else torch.cat
        return self.down(cat([torch.relu(self.a(x)), self.b(x) * 2.0], -1))


# ---- what must pin: scans, sorts, reductions, softmax, permutations, padding ------------------
class ScanChannels(_Block):
    """A scan along the channels: down(cumsum(up(x), -1)) must not be a free channel group."""

    VARIANTS = ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        out = getattr(torch, self.kind)(h, -1)
        return self.down(out.values if self.kind in ("cummax", "cummin") else out)


class ScanTokens(_Block):
    """A scan along the sequence (a causal running mean): channels stay prunable."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.cumsum(h, 1) * 0.5)


class SortChannels(_Block):
    """Sorting or top-k along the channels mixes them."""

    VARIANTS = ("sort", "argsort_gather", "topk")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, self.i), nn.Linear(self.i, hidden)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "sort":
            return self.down(torch.sort(h, -1).values)
        if self.kind == "argsort_gather":
            return self.down(torch.gather(h, -1, h.argsort(-1)))
        top = torch.topk(h, self.i // 2, -1).values
        return self.down(torch.cat([top, top], -1))


class ReduceChannels(_Block):
    """A statistic over the channels scales them: removing a unit changes it."""

    VARIANTS = ("mean", "amax", "norm", "logsumexp", "var", "max_dim", "sum", "std", "amin", "prod",
                "item")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)

    def forward(self, x):
        h = self.up(x)
        k = self.kind
        if k == "norm":
            s = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        elif k == "max_dim":
            s = h.max(-1).values.unsqueeze(-1)
        elif k == "prod":
            s = torch.tanh(h).prod(-1, keepdim=True)
        elif k == "item":  # a value read out as a Python number
            s = h.abs().amax().item()
        else:
            s = getattr(torch, k)(h, -1, keepdim=True)
        return self.down(h * s)


class SoftmaxChannels(_Block):
    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)

    def forward(self, x):
        return self.down(torch.softmax(self.up(x), -1))


class NormInner(_Block):
    """A layer norm / RMS norm over the inner width pins it; its weight is a member."""

    VARIANTS = ("layer", "rms")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)
        self.norm = nn.LayerNorm(i) if self.kind == "layer" else nn.RMSNorm(i)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


class PermuteChannels(_Block):
    """Flip, roll, a triangle of a weight, differences: positions of units matter."""

    VARIANTS = ("flip", "roll", "triu", "diff")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)
        self.mix = nn.Parameter(torch.randn(i, i) / i)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "flip":
            h = h.flip(-1)
        elif self.kind == "roll":
            h = h.roll(1, -1)
        elif self.kind == "triu":
            h = h @ torch.triu(self.mix)
        else:
            h = torch.cat([torch.diff(h, dim=-1), h[..., :1]], -1)
        return self.down(h)


class PadChannels(_Block):
    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i + 3, hidden)

    def forward(self, x):
        return self.down(F.pad(self.up(x), (1, 2), value=0.5))


class StackInterleave(_Block):
    """Interleaving two tensors by stack + flatten (rotary-style): the stacked dim is pinned."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.a, self.b = nn.Linear(hidden, i), nn.Linear(hidden, i)
        self.down = nn.Linear(2 * i, hidden)

    def forward(self, x):
        return self.down(torch.stack([self.a(x), -self.b(x)], -1).flatten(-2))


class SelectUnbind(_Block):
    """One channel selected to scale the others, or halves unbound and multiplied."""

    VARIANTS = ("select", "unbind")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.up = nn.Linear(hidden, self.i)
        self.down = nn.Linear(self.i if self.kind == "select" else self.i // 2, hidden)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "select":
            return self.down(h * h.select(-1, 0).unsqueeze(-1))
        a, b = h.unflatten(-1, (2, self.i // 2)).unbind(-2)
        return self.down(a * b)


class IndexChannels(_Block):
    """Channels permuted or written by a fixed index: index, index_select, gather, scatter,
    index_fill, index_copy, index_add, narrow and slice/select_scatter."""

    VARIANTS = ("index", "index_select", "gather", "scatter", "index_fill", "index_copy",
                "index_add", "index_put", "narrow", "slice_scatter", "select_scatter")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.up = nn.Linear(hidden, self.i)
        self.down = nn.Linear(self.i // 2 if self.kind == "narrow" else self.i, hidden)
        perm = list(range(self.i))
        rng.shuffle(perm)
        self.register_buffer("perm", torch.tensor(perm))

    def forward(self, x):
        h = self.up(x)
        k, p = self.kind, self.perm
        if k == "index":
            h = h[..., p]
        elif k == "index_select":
            h = h.index_select(-1, p)
        elif k == "gather":
            h = torch.gather(h, -1, p.expand(h.shape))
        elif k == "scatter":
            h = torch.zeros_like(h).scatter(-1, p.expand(h.shape), h)
        elif k == "index_fill":
            h = h.index_fill(-1, p[:1], 0.25)
        elif k == "index_put":
            h = h.clone()
            h[..., p[:2]] = h[..., p[2:4]]
        elif k == "index_copy":
            h = h.index_copy(-1, p, h * 2.0)
        elif k == "index_add":
            h = h.index_add(-1, p, h)
        elif k == "narrow":
            h = h.narrow(-1, 0, self.i // 2)
        elif k == "slice_scatter":
            h = torch.slice_scatter(h, h[..., 1:2] * 3.0, -1, 0, 1)
        else:
            h = torch.select_scatter(h, h[..., 1] * 3.0, -1, 0)
        return self.down(h)


class IndexTokens(_Block):
    """Index ops along the sequence (data-dependent, from the token ids' values through a
    comparison): channels stay prunable. index_put, masked_fill, masked_scatter, a token select."""

    VARIANTS = ("index_put", "masked_fill", "masked_scatter", "first_token")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)
        self.register_buffer("pos", torch.tensor([0, 1]))

    def forward(self, x):
        h = self.up(x)
        mask = x[..., :1] > 0  # [b, t, 1]
        if self.kind == "index_put":
            h = h.clone()
            h[:, self.pos] = h[:, self.pos] * 0.5
        elif self.kind == "masked_fill":
            h = h.masked_fill(mask, 0.0)
        elif self.kind == "masked_scatter":
            h = h.masked_scatter(mask.expand(h.shape), h * 2.0)
        else:
            h = h + h[:, 0:1] * h.select(1, 0).unsqueeze(1)
        return self.down(h)


class ComplexRotary(_Block):
    """Pairs of channels as complex numbers rotated by a fixed table (complex RoPE)."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, self.i), nn.Linear(self.i, hidden)
        angles = torch.arange(self.i // 2, dtype=torch.float32) * 0.3
        self.register_buffer("rot", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x):
        h = self.up(x)
        c = torch.view_as_complex(h.unflatten(-1, (self.i // 2, 2)).contiguous())
        return self.down(torch.view_as_real(c * self.rot).flatten(-2))


class ViewsAs(_Block):
    """view_as / reshape_as / expand_as / mT, squeeze and unsqueeze round trips, real of a real."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)
        self.scale = nn.Parameter(torch.ones(1, 1, i))

    def forward(self, x):
        h = self.up(x)
        g = h.unsqueeze(0).squeeze(0).reshape_as(h).view_as(h).mT.mT
        s = self.scale.expand_as(g)
        return self.down(torch.real(g * s))


class Factories(_Block):
    """Tensors of one value (zero states, padding blocks) added to a channel space."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, self.i), nn.Linear(self.i, hidden)

    def forward(self, x):
        h = self.up(x)
        state = torch.zeros(h.shape[0], h.shape[1], self.i) + torch.full_like(h, 0.5)
        state = state + h.new_ones(h.shape) * torch.ones(self.i)
        return self.down(h * state)


# ---- linear algebra --------------------------------------------------------------------------
class EinsumBmm(_Block):
    """A projection written as einsum, bmm, baddbmm or addmm (GPT-2's Conv1D)."""

    VARIANTS = ("einsum", "bmm", "baddbmm", "addmm")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.w_in = nn.Parameter(torch.randn(i, hidden) / math.sqrt(hidden))
        self.w_out = nn.Parameter(torch.randn(hidden, i) / math.sqrt(i))
        self.bias = nn.Parameter(torch.zeros(i))

    def forward(self, x):
        b = x.shape[0]
        if self.kind == "einsum":
            h = torch.einsum("btc,ic->bti", x, self.w_in)
        elif self.kind == "bmm":
            h = torch.bmm(x, self.w_in.t().unsqueeze(0).expand(b, -1, -1))
        elif self.kind == "baddbmm":
            h = torch.baddbmm(self.bias, x, self.w_in.t().unsqueeze(0).expand(b, -1, -1))
        else:
            h = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.w_in.t()).view(
                b, -1, self.w_in.shape[0])
        h = torch.relu(h)
        return torch.einsum("bti,hi->bth", h, self.w_out)


class ActivationContraction(_Block):
    """Two activations contracted over a channel space (q . k without attention): pinned."""

    VARIANTS = ("matmul", "einsum")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.q, self.k = nn.Linear(hidden, i), nn.Linear(hidden, i)
        self.v = nn.Linear(hidden, hidden)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.kind == "matmul":
            s = (q.unsqueeze(-2) @ k.unsqueeze(-1)).squeeze(-1)
        else:
            s = torch.einsum("bti,bti->bt", q, k).unsqueeze(-1)
        return self.v(x) * torch.tanh(s)


class Attention(_Block):
    """Multi-head attention with GQA (expand + reshape or repeat_interleave), sdpa or eager."""

    VARIANTS = ("sdpa_expand", "sdpa_gqa", "eager_interleave")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.kv = rng.choice((1, 2))
        self.rep = rng.choice((1, 2))
        self.hd = rng.choice((2, 4))
        self.heads = self.kv * self.rep
        self.q = nn.Linear(hidden, self.heads * self.hd, bias=False)
        self.k = nn.Linear(hidden, self.kv * self.hd, bias=False)
        self.v = nn.Linear(hidden, self.kv * self.hd, bias=False)
        self.o = nn.Linear(self.heads * self.hd, hidden, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.kind == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.kind == "sdpa_expand":
            k = k[:, :, None].expand(b, self.kv, self.rep, t, self.hd).reshape(b, self.heads, t, self.hd)
            v = v[:, :, None].expand(b, self.kv, self.rep, t, self.hd).reshape(b, self.heads, t, self.hd)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k = k.repeat_interleave(self.rep, 1)
            v = v.repeat_interleave(self.rep, 1)
            w = torch.softmax((q @ k.transpose(-1, -2)) * self.hd ** -0.5, -1)
            o = w @ v
        return self.o(o.transpose(1, 2).reshape(b, t, self.heads * self.hd))


class DepthwiseConv(_Block):
    """Mamba-style causal depthwise conv over time: the channel space passes through."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.up, self.down = nn.Linear(hidden, i), nn.Linear(i, hidden)
        self.conv = nn.Conv1d(i, i, 3, groups=i, padding=2)

    def forward(self, x):
        h = self.up(x).transpose(1, 2)
        h = self.conv(h)[..., : x.shape[1]]
        return self.down(F.silu(h.transpose(1, 2)))


class ChannelConv(_Block):
    """A convolution that maps channels (groups 1 or 2): input channels consume."""

    VARIANTS = ("1", "2")

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        i = _inner(rng)
        self.groups = int(self.kind)
        self.up = nn.Linear(hidden, i)
        self.conv = nn.Conv1d(i, 2 * i, 1, groups=self.groups)
        self.down = nn.Linear(2 * i, hidden)

    def forward(self, x):
        return self.down(torch.relu(self.conv(self.up(x).transpose(1, 2))).transpose(1, 2))


# ---- mixtures of experts ---------------------------------------------------------------------
class MoeDense(_Block):
    """Top-k router, routing weights scattered into a dense [tokens, experts] matrix, every
    expert computed by einsum over fused weights, combined by a routed contraction."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.e, i = rng.choice((3, 4)), _inner(rng)
        self.router = nn.Linear(hidden, self.e, bias=False)
        self.w1 = nn.Parameter(torch.randn(self.e, i, hidden) / math.sqrt(hidden))
        self.w2 = nn.Parameter(torch.randn(self.e, hidden, i) / math.sqrt(i))

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        top, ids = torch.topk(probs, 2, -1)
        dense = torch.zeros_like(probs).scatter(-1, ids, top)
        h = F.silu(torch.einsum("bth,eih->btei", x, self.w1))
        y = torch.einsum("btei,ehi->bteh", h, self.w2)
        return torch.einsum("bteh,bte->bth", y, dense)


class MoeGrouped(_Block):
    """transformers' grouped path: ids sorted, tokens per expert counted (histc / bincount),
    offsets by cumsum, one grouped matmul per projection, combined with index_add."""


    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.e, self.i = rng.choice((3, 4)), 8 * rng.randint(1, 2)
        self.router = nn.Linear(hidden, self.e, bias=False)
        self.gate_up = nn.Parameter(torch.randn(self.e, hidden, 2 * self.i) / math.sqrt(hidden))
        self.down = nn.Parameter(torch.randn(self.e, self.i, hidden) / math.sqrt(self.i))

    def forward(self, x):
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        weights, ids = torch.topk(torch.softmax(self.router(flat), -1), 2, -1)
        ids_flat = ids.reshape(-1)
        order = torch.argsort(ids_flat)
        token = order // 2
        counts = torch.histc(ids_flat.float(), bins=self.e, min=0, max=self.e - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu = torch.ops.transformers.grouped_mm_fallback(flat[token], self.gate_up, offs)
        g, u = gu.chunk(2, -1)
        y = torch.ops.transformers.grouped_mm_fallback(F.silu(g) * u, self.down, offs)
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add(0, token, y)
        return out.view(b, t, h)


class MoeIndexed(_Block):
    """Expert weights gathered by the routed ids (``w[ids]``) and applied with a matmul;
    one-hot routing masks."""

    def __init__(self, hidden, rng, kind=None):
        super().__init__(hidden, rng, kind)
        self.e, i = rng.choice((3, 4)), _inner(rng)
        self.router = nn.Linear(hidden, self.e, bias=False)
        self.w1 = nn.Parameter(torch.randn(self.e, hidden, i) / math.sqrt(hidden))
        self.w2 = nn.Parameter(torch.randn(self.e, i, hidden) / math.sqrt(i))

    def forward(self, x):
        logits = self.router(x)
        top, ids = torch.topk(logits, 2, -1)
        mask = F.one_hot(ids, self.e).sum(-2)  # [b, t, e] selected experts
        w = torch.softmax(top, -1)
        h = F.gelu(x.unsqueeze(-2).unsqueeze(-2) @ self.w1[ids]).squeeze(-2)  # [b, t, k, i]
        y = (h.unsqueeze(-2) @ self.w2[ids]).squeeze(-2)                       # [b, t, k, h]
        routed = torch.bincount(ids.reshape(-1), minlength=self.e).sum()  # tokens x top-k
        return (y * w.unsqueeze(-1)).sum(-2) * (mask.sum(-1, keepdim=True) > 0) * (routed > 0)


BLOCKS: dict[str, type[_Block]] = {cls.__name__: cls for cls in (
    Act, Glu, CatTwo, ScanChannels, ScanTokens, SortChannels, ReduceChannels, SoftmaxChannels,
    NormInner, PermuteChannels, PadChannels, StackInterleave, SelectUnbind, IndexChannels,
    IndexTokens, ComplexRotary, ViewsAs, Factories, EinsumBmm, ActivationContraction, Attention,
    DepthwiseConv, ChannelConv, MoeDense, MoeGrouped, MoeIndexed)}


def build(names: list[str], hidden: int, seed: int) -> RandomLM:
    """A RandomLM of the named blocks (``Name`` or ``Name:kind``), with sizes and unnamed
    variants drawn from ``seed``."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks = []
    for n in names:
        name, _, kind = n.partition(":")
        blocks.append(BLOCKS[name](hidden, rng, kind or None))
    return RandomLM(hidden, blocks).eval()


def every_variant() -> list[str]:
    return [f"{name}:{kind}" if kind else name
            for name, cls in BLOCKS.items() for kind in cls.VARIANTS]
