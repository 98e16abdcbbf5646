"""Rules for whole families of ops, and for the index, scan, convolution and view ops that the
causal LMs of transformers use beyond the core set in ``rules.py``.

Families come from PyTorch's own op metadata, so an op added to PyTorch later needs no code:

* ``torch.Tag.pointwise``: elementwise with broadcasting (``square``, ``softplus``, ``min.other``,
  ``lerp``, ``addcmul`` ...): equal dims unify, size-1 dims broadcast.
* ``torch.Tag.reduction``: the reduced dims are pinned (removing a unit changes a sum, a max or a
  norm; see :meth:`~prunegraph.ir.analysis.spaces.Spaces.pin_unless_routed` for the one exception,
  a routed experts space), the kept dims pass through, with the output shapes ``keepdim`` gives.

What every rule here must respect (the property test ``tests/analysis/test_random_graphs.py``
checks it on random graphs): a dim whose entries are *mixed* (scanned, sorted, reduced,
gathered by data, convolved over) is pinned; a dim whose entries pass through one to one is
unified with the output dim it becomes; an index tensor whose *values* name the units of a space
(``value_space``) routes instead of pinning.
"""

from __future__ import annotations

import torch

from prunegraph.ir.analysis.registry import Origin, RuleContext, Value, family, rule
from prunegraph.ir.analysis.rules import (
    _broadcast,
    _carry,
    _cut,
    _cut_or_pin,
    _expand,
    _norm_dim,
    _reshape,
    aten,
)
from prunegraph.ir.analysis.spaces import Conflict, as_size, is_static

__all__: list[str] = []


def _mixed(ctx: RuleContext, atom: int, why: str, routed_ok: bool = False) -> None:
    """Pin a dim whose units are mixed by the op (no-op on size-1 and token dims)."""
    if ctx.spaces.static_size(atom) in (None, 1):
        return
    if routed_ok:
        ctx.spaces.pin_unless_routed(atom, f"{why} ({ctx.node.target} in {ctx.module or 'the model'})")
    else:
        ctx.pin(atom, why)


def _derived(ctx: RuleContext, size, why: str) -> int:
    """A new dim whose extent the op derives from a mixed (pinned) input dim or a constant:
    pinned too, since no slicing of a parameter can change it."""
    return ctx.spaces.new(size, **({"pinned": f"{why} ({ctx.node.name})"} if is_static(size) else {}))


def _outputs(ctx: RuleContext) -> list:
    val = ctx.node.meta.get("val")
    return list(val) if isinstance(val, (tuple, list)) else [val]


# ---- families ------------------------------------------------------------------------------
@family(lambda op: torch.Tag.pointwise in op.tags)
@rule(aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
      aten.hardsigmoid_.default)
def _pointwise(ctx: RuleContext) -> Value:
    return _broadcast(ctx)


@rule(aten.glu.default)
def _glu(ctx: RuleContext) -> Value:
    """``a * sigmoid(b)`` for the two halves of a dim: both halves become the output dim."""
    v = ctx.input(0)
    d = _norm_dim(ctx.param("dim", -1), v.ndim)
    half = as_size(ctx.meta_shape()[d])
    atoms = list(v.atoms)
    try:
        a, b = _cut(ctx, v.atoms[d], 0, half), _cut(ctx, v.atoms[d], half, half)
        ctx.unify(a, b, "glu halves")
        atoms[d] = a
    except Conflict as e:
        ctx.pin(v.atoms[d], f"glu of a structured space ({e})")
        atoms[d] = _derived(ctx, half, "glu of a structured space")
    return Value(atoms, [], None, v.param_dep)


@rule(aten.prelu.default, aten._prelu_kernel.default)
def _prelu(ctx: RuleContext) -> Value:
    """PReLU's weight scales the channel dim (dim 1, or the only dim of a 1-D input)."""
    x, w = ctx.input(0), ctx.input(1)
    if ctx.spaces.static_size(w.atoms[0]) not in (None, 1):
        ctx.unify(w.atoms[0], x.atoms[1 if x.ndim > 1 else 0], "prelu weight")
        ctx.use(w, 0, "norm")
    return Value(list(x.atoms), [], None, True)


def _dims_arg(ctx: RuleContext, ndim: int) -> list[int]:
    dims = ctx.param("dim", None)
    if dims is None or dims == [] or dims == ():
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({_norm_dim(d, ndim) for d in dims})


@family(lambda op: torch.Tag.reduction in op.tags)
@rule(aten.median.dim, aten.mode.default, aten.nanmedian.dim, aten.kthvalue.default,
      aten.mean.dim, aten.var.correction, aten.var.dim, aten.std.correction, aten.amax.default,
      aten.amin.default, aten.logsumexp.default, aten.mean.default, aten.var_mean.correction,
      aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default, aten.sum.dim_IntList,
      aten.sum.default, aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default)
def _reduction(ctx: RuleContext):
    """Reduced dims are mixed (pinned unless routed); ``max.dim``'s indices name positions of
    the reduced space (its value space)."""
    v = ctx.input(0)
    dims = _dims_arg(ctx, v.ndim)
    keepdim = bool(ctx.param("keepdim", False))
    for d in dims:
        _mixed(ctx, v.atoms[d], "reduced over (removing units changes the result)", routed_ok=True)
    atoms: list[int] = []
    origins: list[Origin | None] = []
    for d in range(v.ndim):
        if d in dims:
            if keepdim:
                atoms.append(ctx.spaces.new(1))
                origins.append(None)
        else:
            atoms.append(v.atoms[d])
            origins.append(v.origins[d])
    routed = v.atoms[dims[0]] if len(dims) == 1 else None
    results: list[Value | None] = []
    for t in _outputs(ctx):
        if not isinstance(t, torch.Tensor):
            results.append(None)
            continue
        if t.dim() != len(atoms):
            raise NotImplementedError(f"a reduction output of rank {t.dim()}, not {len(atoms)}")
        index = not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
        results.append(Value(list(atoms), [] if index else list(origins),
                             routed if index else None, v.param_dep))
    return results[0] if len(results) == 1 else tuple(results)


# ---- scans and sorts -------------------------------------------------------------------------
@rule(aten.cumsum.default, aten.cumsum_.default, aten.cumprod.default, aten.logcumsumexp.default,
      aten._logcumsumexp.default)
def _scan(ctx: RuleContext) -> Value:
    """A scan along a dim mixes its entries (pinned) unless it is a routed experts space (the
    offsets of the tokens per expert are a cumsum over experts)."""
    v = ctx.input(0)
    _mixed(ctx, v.atoms[_norm_dim(ctx.param("dim"), v.ndim)], "scanned over", routed_ok=True)
    return _carry(v)


@rule(aten.cummax.default, aten.cummin.default)
def _scan_with_indices(ctx: RuleContext):
    v = ctx.input(0)
    d = _norm_dim(ctx.param("dim"), v.ndim)
    _mixed(ctx, v.atoms[d], "scanned over", routed_ok=True)
    return (_carry(v), Value(list(v.atoms), [], None, v.param_dep))


@rule(aten.argsort.default, aten.argsort.stable)
def _argsort(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    _mixed(ctx, v.atoms[_norm_dim(ctx.param("dim", -1), v.ndim)], "sorted over", routed_ok=True)
    return Value(list(v.atoms), [], None, v.param_dep)


@rule(aten.flip.default, aten.roll.default)
def _permuted_entries(ctx: RuleContext) -> Value:
    """Reverses or rotates the entries of some dims: a unit's position changes, so pinned."""
    v = ctx.input(0)
    dims = ctx.param("dims", None)
    dims = list(range(v.ndim)) if dims in (None, [], ()) else [_norm_dim(d, v.ndim) for d in dims]
    for d in dims:
        _mixed(ctx, v.atoms[d], "entries reversed or rotated")
    return _carry(v)


@rule(aten.tril.default, aten.triu.default, aten.tril_.default, aten.triu_.default)
def _triangle(ctx: RuleContext) -> Value:
    """Keeps entries by their position in the last two dims: those depend on unit indices."""
    v = ctx.input(0)
    for a in v.atoms[-2:]:
        _mixed(ctx, a, "masked by position (triangle)")
    return _carry(v)


# ---- index ops -------------------------------------------------------------------------------
def _routed_or_pinned(ctx: RuleContext, atom: int, index: Value | None, why: str) -> None:
    """``index``'s values select entries of ``atom``: route through its value space or pin."""
    if index is not None and index.value_space is not None:
        ctx.unify(atom, index.value_space, "indexed by routed ids")
        ctx.spaces.flag(atom, "routed", ctx.node.name)
    else:
        _mixed(ctx, atom, why)


@rule(aten.gather.default)
def _gather(ctx: RuleContext) -> Value:
    """``out[i][j] = x[i][idx[i][j]]`` (dim 1): the other dims pass through, the gathered dim
    becomes the index's."""
    x, idx = ctx.input(0), ctx.input(2)
    d = _norm_dim(ctx.param("dim"), x.ndim)
    xs, ids = ctx.meta_shape(ctx.arg(0)), ctx.meta_shape(ctx.arg(2))
    _routed_or_pinned(ctx, x.atoms[d], idx, "gathered by a data-dependent index")
    atoms = []
    for i in range(x.ndim):
        if i == d:
            atoms.append(idx.atoms[i])
        elif as_size(xs[i]) == as_size(ids[i]):
            ctx.unify(x.atoms[i], idx.atoms[i], "gather index dims")
            atoms.append(x.atoms[i])
        else:  # the index covers a prefix of this dim
            _mixed(ctx, x.atoms[i], "partly gathered")
            atoms.append(idx.atoms[i])
    # the dims that pass through stay views of the gathered tensor (a parameter's, for experts
    # weights gathered by routed ids: a matmul with them is still a gate site)
    origins = [x.origins[i] if i != d and atoms[i] == x.atoms[i] else None for i in range(x.ndim)]
    return Value(atoms, origins, x.value_space, x.param_dep or idx.param_dep)


@rule(aten.scatter.src, aten.scatter.value, aten.scatter_.src, aten.scatter_.value,
      aten.scatter_add.default, aten.scatter_add_.default, aten.scatter_reduce.two,
      aten.scatter_reduce_.two, aten.scatter.reduce, aten.scatter.value_reduce)
def _scatter(ctx: RuleContext) -> Value:
    """``self[i][idx[i][j]] = src[i][j]`` (dim 1): the output is ``self``; routed ids (one-hot
    routing masks from top-k ids) unify the scattered dim with the experts space."""
    x, idx = ctx.input(0), ctx.input(2)
    src = ctx.value(ctx.param("src"))
    d = _norm_dim(ctx.param("dim"), x.ndim)
    xs, ids = ctx.meta_shape(ctx.arg(0)), ctx.meta_shape(ctx.arg(2))
    _routed_or_pinned(ctx, x.atoms[d], idx, "scattered into by a data-dependent index")
    srcs = ctx.meta_shape(ctx.param("src")) if src is not None else None
    for i in range(x.ndim):
        if src is not None and srcs is not None and as_size(srcs[i]) == as_size(ids[i]):
            ctx.unify(src.atoms[i], idx.atoms[i], "scatter source and index")
        elif src is not None:
            _mixed(ctx, src.atoms[i], "partly scattered")
        if i == d:
            continue
        if as_size(xs[i]) == as_size(ids[i]):
            ctx.unify(x.atoms[i], idx.atoms[i], "scatter index dims")
        else:
            _mixed(ctx, x.atoms[i], "partly scattered into")
    return Value(list(x.atoms), list(x.origins), x.value_space,
                 x.param_dep or (src is not None and src.param_dep))


@rule(aten.index_select.default)
def _index_select(ctx: RuleContext) -> Value:
    x, idx = ctx.input(0), ctx.input(2)
    d = _norm_dim(ctx.param("dim"), x.ndim)
    _routed_or_pinned(ctx, x.atoms[d], idx, "selected by a data-dependent index")
    atoms, origins = list(x.atoms), list(x.origins)
    atoms[d] = idx.atoms[0] if idx.ndim == 1 else _derived(ctx, ctx.meta_shape()[d], "selected")
    origins[d] = None
    return Value(atoms, origins, x.value_space, x.param_dep)


@rule(aten.index_fill.int_Scalar, aten.index_fill_.int_Scalar, aten.index_fill.int_Tensor,
      aten.index_fill_.int_Tensor)
def _index_fill(ctx: RuleContext) -> Value:
    x, idx = ctx.input(0), ctx.input(2)
    _routed_or_pinned(ctx, x.atoms[_norm_dim(ctx.param("dim"), x.ndim)], idx,
                      "filled at data-dependent indices")
    return _carry(x)


@rule(aten.index_copy.default, aten.index_copy_.default, aten.index_add.default,
      aten.index_add_.default)
def _index_copy(ctx: RuleContext) -> Value:
    x, idx, src = ctx.input(0), ctx.input(2), ctx.value(ctx.param("source"))
    d = _norm_dim(ctx.param("dim"), x.ndim)
    _routed_or_pinned(ctx, x.atoms[d], idx, "written at data-dependent indices")
    if src is not None:
        for i in range(x.ndim):
            if i == d:
                ctx.unify(src.atoms[i], idx.atoms[0], "index source rows")
            else:
                ctx.unify(src.atoms[i], x.atoms[i], "index source dims")
    return Value(list(x.atoms), list(x.origins), x.value_space,
                 x.param_dep or (src is not None and src.param_dep))


@rule(aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
def _index_put(ctx: RuleContext) -> Value:
    """``self[idx0, idx1, ...] = values``: the indexed dims route or pin, the dims left whole
    unify with the trailing dims of ``values``; what cannot be matched is pinned."""
    x = ctx.input(0)
    indices = list(ctx.param("indices") or [])
    vals = ctx.value(ctx.param("values"))
    whole = []
    for k in range(x.ndim):
        idx = ctx.value(indices[k]) if k < len(indices) and indices[k] is not None else None
        if idx is not None:
            _routed_or_pinned(ctx, x.atoms[k], idx, "written at data-dependent indices")
        else:
            whole.append(k)
    if vals is not None:
        vshape = ctx.meta_shape(ctx.param("values"))
        matched = set()
        for j, k in enumerate(reversed(whole)):
            vd = vals.ndim - 1 - j
            if vd < 0:
                break
            if as_size(vshape[vd]) == 1 and ctx.spaces.static_size(x.atoms[k]) != 1:
                matched.add(vd)  # broadcast
                continue
            ctx.unify(vals.atoms[vd], x.atoms[k], "index_put values")
            matched.add(vd)
        for vd in range(vals.ndim):
            if vd not in matched:
                _mixed(ctx, vals.atoms[vd], "written at data-dependent indices")
    return Value(list(x.atoms), list(x.origins), x.value_space,
                 x.param_dep or (vals is not None and vals.param_dep))


@rule(aten.masked_scatter.default, aten.masked_scatter_.default)
def _masked_scatter(ctx: RuleContext) -> Value:
    """``self[mask] = source`` (flattened): the source's entries land where the mask says."""
    x, src = ctx.input(0), ctx.value(ctx.arg(2))
    if src is not None:
        for a in src.atoms:
            _mixed(ctx, a, "scattered by a mask")
    mask = ctx.value(ctx.arg(1))
    if mask is not None:
        off = x.ndim - mask.ndim
        for i, a in enumerate(mask.atoms):
            if ctx.spaces.static_size(a) != 1 or ctx.spaces.static_size(x.atoms[off + i]) == 1:
                ctx.unify(a, x.atoms[off + i], "mask dims")
    return Value(list(x.atoms), list(x.origins), x.value_space, True)


@rule(aten.select.int, aten.select_copy.int)
def _select(ctx: RuleContext) -> Value:
    """One entry of a dim: which unit it is depends on indices, so that dim is pinned."""
    v = ctx.input(0)
    d = _norm_dim(ctx.param("dim"), v.ndim)
    _mixed(ctx, v.atoms[d], "one entry selected")
    keep = [i for i in range(v.ndim) if i != d]
    return Value([v.atoms[i] for i in keep], [v.origins[i] for i in keep], v.value_space, v.param_dep)


@rule(aten.unbind.int, aten.unbind_copy.int)
def _unbind(ctx: RuleContext):
    v = ctx.input(0)
    d = _norm_dim(ctx.param("dim", 0), v.ndim)
    _mixed(ctx, v.atoms[d], "unbound into separate tensors")
    keep = [i for i in range(v.ndim) if i != d]
    return tuple(Value([v.atoms[i] for i in keep], [v.origins[i] for i in keep], v.value_space,
                       v.param_dep) for _ in _outputs(ctx))


@rule(aten.select_scatter.default)
def _select_scatter(ctx: RuleContext) -> Value:
    x, src = ctx.input(0), ctx.input(1)
    d = _norm_dim(ctx.param("dim"), x.ndim)
    _mixed(ctx, x.atoms[d], "one entry written")
    keep = [i for i in range(x.ndim) if i != d]
    for j, i in enumerate(keep):
        ctx.unify(src.atoms[j], x.atoms[i], "select_scatter source")
    return Value(list(x.atoms), list(x.origins), x.value_space, x.param_dep or src.param_dep)


@rule(aten.slice_scatter.default)
def _slice_scatter(ctx: RuleContext) -> Value:
    """Writes ``src`` into a range of a dim: the range becomes a segment of that space."""
    x, src = ctx.input(0), ctx.input(1)
    d = _norm_dim(ctx.param("dim", 0), x.ndim)
    for i in range(x.ndim):
        if i != d:
            ctx.unify(src.atoms[i], x.atoms[i], "slice_scatter source")
    start, step = ctx.param("start", 0) or 0, ctx.param("step", 1) or 1
    length = as_size(ctx.meta_shape(ctx.arg(1))[d])
    if length != ctx.spaces.size(x.atoms[d]):
        if step != 1 or not isinstance(start, int) or not is_static(length) \
                or ctx.spaces.static_size(x.atoms[d]) is None:
            _mixed(ctx, x.atoms[d], "written in a strided or data-dependent range")
            _mixed(ctx, src.atoms[d], "written in a strided or data-dependent range")
        else:
            if start < 0:
                start += ctx.spaces.static_size(x.atoms[d]) or 0  # static: checked above
            try:
                ctx.unify(_cut(ctx, x.atoms[d], start, length), src.atoms[d], "slice_scatter range")
            except Conflict as e:
                ctx.pin(x.atoms[d], f"slice of a structured space ({e})")
                ctx.pin(src.atoms[d], f"slice of a structured space ({e})")
    else:
        ctx.unify(src.atoms[d], x.atoms[d], "slice_scatter source")
    return Value(list(x.atoms), list(x.origins), x.value_space, x.param_dep or src.param_dep)


@rule(aten.one_hot.default)
def _one_hot(ctx: RuleContext) -> Value:
    """One-hot of routed ids: the new dim is the space the ids name."""
    v = ctx.input(0)
    n = ctx.meta_shape()[-1]
    last = v.value_space if v.value_space is not None and \
        ctx.spaces.size(v.value_space) == as_size(n) else ctx.spaces.new(n, pinned="one-hot classes")
    if last == v.value_space:
        ctx.spaces.flag(last, "routed", ctx.node.name)
    return Value(list(v.atoms) + [last], [], None, v.param_dep)


@rule(aten.bincount.default)
def _bincount(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    n = ctx.meta_shape()[0]
    if v.value_space is not None and ctx.spaces.size(v.value_space) == as_size(n):
        ctx.spaces.flag(v.value_space, "routed", ctx.node.name)
        return Value([v.value_space], [], None, True)
    for a in v.atoms:  # counts of plain values mix every entry
        _mixed(ctx, a, "counted")
    return Value([ctx.spaces.new(n, pinned="bin counts")], [], None, True)


# ---- stacking --------------------------------------------------------------------------------
@rule(aten.stack.default)
def _stack(ctx: RuleContext) -> Value:
    """Stacking ``n`` tensors: their dims unify; the new dim says which tensor an entry came
    from, which no parameter slice expresses, so it is pinned."""
    vals = [v for t in ctx.param("tensors") if (v := ctx.value(t)) is not None]
    shape = ctx.meta_shape()
    d = _norm_dim(ctx.param("dim", 0), len(shape))
    first = vals[0]
    for v in vals[1:]:
        for a, b in zip(first.atoms, v.atoms):
            ctx.unify(a, b, "stacked tensors")
    new = ctx.spaces.new(shape[d], **({"pinned": "stacked tensors"} if as_size(shape[d]) != 1 else {}))
    atoms = first.atoms[:d] + [new] + first.atoms[d:]
    return Value(atoms, [], None, any(v.param_dep for v in vals))


# ---- linear algebra --------------------------------------------------------------------------
@rule(aten.baddbmm.default, aten.addbmm.default)
def _baddbmm(ctx: RuleContext) -> Value:
    """``beta * input + alpha * (batch1 @ batch2)`` (``addbmm`` also sums the batch)."""
    a, b, inp = ctx.input(1), ctx.input(2), ctx.input(0)
    ctx.unify(a.atoms[-1], b.atoms[-2], "matmul contraction")
    for v, k in ((a, a.ndim - 1), (b, b.ndim - 2)):
        ctx.use(v, k, "consumer")
    ctx.use(a, a.ndim - 2, "producer")
    ctx.use(b, b.ndim - 1, "producer")
    if ctx.node.target is aten.addbmm.default:
        _mixed(ctx, a.atoms[0], "summed over the batch", routed_ok=True)
        ctx.unify(a.atoms[0], b.atoms[0], "matmul batch")
        prod = [a.atoms[-2], b.atoms[-1]]
    else:
        ctx.unify(a.atoms[0], b.atoms[0], "matmul batch")
        prod = [a.atoms[0], a.atoms[-2], b.atoms[-1]]
    in_shape = ctx.meta_shape(ctx.arg(0))
    off = len(prod) - inp.ndim
    for i, s in enumerate(in_shape):
        if as_size(s) != 1:
            ctx.unify(inp.atoms[i], prod[i + off], "baddbmm input")
    return Value(prod, [], None, True)


@rule(aten.einsum.default)
def _einsum(ctx: RuleContext) -> Value:
    """Equal letters unify; a parameter's contracted letters consume, its kept letters produce;
    a letter contracted between two activations is mixed (pinned unless routed)."""
    eq = ctx.arg(0).replace(" ", "")
    maybe = [ctx.value(t) for t in ctx.arg(1)]
    ops = [v for v in maybe if v is not None]
    if len(ops) != len(maybe) or "->" not in eq:
        raise NotImplementedError("einsum without an explicit output or with a non-tensor")
    lhs, out = eq.split("->")
    shapes = [ctx.meta_shape(t) for t in ctx.arg(1)]

    def expand(term: str, ndim: int) -> str:
        if "..." not in term:
            return term
        n = ndim - (len(term) - 3)
        return term.replace("...", "".join(chr(0x100 + i) for i in range(n)))

    terms = [expand(t, v.ndim) for t, v in zip(lhs.split(","), ops)]
    out = expand(out, len(ctx.meta_shape()))
    letters: dict[str, int] = {}
    ones: dict[str, int] = {}
    for term, v, shape in zip(terms, ops, shapes):
        for k, ch in enumerate(term):
            if as_size(shape[k]) == 1:
                ones.setdefault(ch, v.atoms[k])
            elif ch in letters:
                ctx.unify(letters[ch], v.atoms[k], "einsum index")
            else:
                letters[ch] = v.atoms[k]
    for term, v in zip(terms, ops):
        for k, ch in enumerate(term):
            ctx.use(v, k, "producer" if ch in out else "consumer")
    for ch, a in letters.items():
        if ch not in out and not any(ch in t and v.origins[t.index(ch)] is not None
                                     for t, v in zip(terms, ops)):
            _mixed(ctx, a, "contracted between activations", routed_ok=True)
    atoms = [letters.get(ch) or ones.get(ch) or ctx.spaces.new(s)
             for ch, s in zip(out, ctx.meta_shape())]
    return Value(atoms, [], None, True)


# ---- convolution and padding -----------------------------------------------------------------
@rule(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
      aten.conv1d.padding, aten.conv2d.padding, aten._convolution.default)
def _conv(ctx: RuleContext) -> Value:
    """Convolution: input channels are consumed and output channels produced, per group.

    A depthwise convolution (``groups`` = channels, one filter per channel: the causal conv of
    Mamba-style layers) is channelwise: its channel space passes through, like a norm weight.
    The window dims are mixed (pinned), and so is the filter's kernel dim.
    """
    if ctx.param("transposed", False):
        raise NotImplementedError("transposed convolution")
    x, w = ctx.input(0), ctx.input(1)
    b = ctx.value(ctx.param("bias"))
    groups = int(ctx.param("groups", 1) or 1)
    c = x.ndim - (w.ndim - 1)  # the channel dim (0 for unbatched input)
    sp = ctx.spaces
    cin, cout, per = sp.static_size(x.atoms[c]), sp.static_size(w.atoms[0]), sp.static_size(w.atoms[1])
    for k in range(2, w.ndim):
        ctx.pin(w.atoms[k], "convolution kernel window")
    for k in range(c + 1, x.ndim):
        _mixed(ctx, x.atoms[k], "convolved over")
    if groups == 1:
        ctx.unify(x.atoms[c], w.atoms[1], "convolution input channels")
        ctx.use(w, 1, "consumer")
        ctx.use(w, 0, "producer")
        out_c = w.atoms[0]
    elif groups == cin and cout == cin and per == 1:
        ctx.unify(x.atoms[c], w.atoms[0], "depthwise convolution channels")
        ctx.use(w, 0, "norm")
        out_c = w.atoms[0]
    else:
        if cin is None or cout is None or cin % groups or cout % groups:
            raise NotImplementedError("grouped convolution of a symbolic channel count")
        gin, gout = sp.new(groups), sp.new(groups)
        xin, wout = sp.new(cin), sp.new(cout)
        sp.define(xin, "prod", [gin, sp.new(cin // groups)])
        sp.define(wout, "prod", [gout, sp.new(cout // groups)])
        ctx.unify(gin, gout, "convolution groups")
        ctx.unify(x.atoms[c], xin, "grouped convolution input")
        ctx.unify(w.atoms[0], wout, "grouped convolution output")
        defn = sp.defn(xin)
        assert defn is not None  # defined as a product just above
        ctx.unify(defn[1][1], w.atoms[1], "grouped convolution input per group")
        ctx.use(w, 1, "consumer")
        ctx.use(w, 0, "producer")
        out_c = w.atoms[0]
    if b is not None:
        ctx.unify(b.atoms[0], w.atoms[0], "convolution bias")
        ctx.use(b, 0, "bias")
    shape = ctx.meta_shape()
    atoms = list(x.atoms[:c]) + [out_c]
    for k in range(c + 1, x.ndim):
        same = as_size(shape[k]) == sp.size(x.atoms[k])
        atoms.append(x.atoms[k] if same and sp.static_size(x.atoms[k]) is None
                     else _derived(ctx, shape[k], "convolved over"))
    return Value(atoms, [], None, True)


@rule(aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default,
      aten.reflection_pad2d.default, aten.replication_pad1d.default,
      aten.replication_pad2d.default)
def _pad(ctx: RuleContext) -> Value:
    """Padding (pairs from the last dim backwards): a padded dim of a parameter space is
    pinned; token dims just change length."""
    v = ctx.input(0)
    pad = list(ctx.param("pad", None) or ctx.param("padding", None) or [])
    shape = ctx.meta_shape()
    atoms = list(v.atoms)
    origins = list(v.origins)
    for i in range(len(pad) // 2):
        d = v.ndim - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        if isinstance(lo, int) and isinstance(hi, int) and lo == 0 and hi == 0:
            continue
        _mixed(ctx, v.atoms[d], "padded")
        atoms[d] = _derived(ctx, shape[d], "padded")
        origins[d] = None
    return Value(atoms, origins, v.value_space, v.param_dep)


# ---- views: complex, *_as --------------------------------------------------------------------
@rule(aten.view_as_complex.default)
def _view_as_complex(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    ctx.pin(v.atoms[-1], "real and imaginary parts")
    return Value(list(v.atoms[:-1]), list(v.origins[:-1]), None, v.param_dep)


@rule(aten.view_as_real.default)
def _view_as_real(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    return Value(list(v.atoms) + [ctx.spaces.new(2, pinned="real and imaginary parts")],
                 list(v.origins) + [None], None, v.param_dep)


@rule(aten.real.default, aten.imag.default, aten._conj.default, aten.conj.default,
      aten.conj_physical.default, aten.resolve_conj.default, aten.resolve_neg.default,
      aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default, aten.fill.Scalar,
      aten.positive.default, aten.lift_fresh.default, aten.detach_.default)
def _same_dims(ctx: RuleContext) -> Value:
    return _carry(ctx.input(0))


@rule(aten.view_as.default, aten.reshape_as.default)
def _view_as(ctx: RuleContext) -> Value:
    return _reshape(ctx)


@rule(aten.expand_as.default)
def _expand_as(ctx: RuleContext) -> Value:
    return _expand(ctx)


@rule(aten.narrow.default)
def _narrow(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    d = _norm_dim(ctx.param("dim"), v.ndim)
    start = ctx.param("start")
    length = as_size(ctx.meta_shape()[d])
    atoms, origins = list(v.atoms), list(v.origins)
    if not isinstance(start, int) or ctx.spaces.static_size(v.atoms[d]) is None or not is_static(length):
        _mixed(ctx, v.atoms[d], "narrowed to a data-dependent range")
        atoms[d] = _derived(ctx, length, "narrowed to a data-dependent range")
    else:
        if start < 0:
            start += ctx.spaces.static_size(v.atoms[d]) or 0  # static: checked above
        atoms[d] = _cut_or_pin(ctx, v.atoms[d], start, length)
    origins[d] = None
    return Value(atoms, origins, v.value_space, v.param_dep)


@rule(aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
      aten.empty_strided.default, aten.zeros_like.default, aten.ones_like.default,
      aten.full_like.default, aten.empty_like.default)
def _uniform_factory(ctx: RuleContext) -> Value:
    """A tensor filled with one value (a scan's zero state, a padding block): the same in every
    unit, so its dims relate to whatever they meet without pinning it. Its size is a constant
    of the graph: a model that builds it from a module attribute gets that attribute rewritten
    by slicing (``prunegraph.plan.slicing.LAYER_ATTRIBUTES``); position-dependent factories
    (``arange``) have no rule and pin what they meet."""
    v = ctx.value(ctx.arg(0))
    shape = ctx.meta_shape()
    if v is not None and len(shape) == v.ndim and all(
            as_size(a) == as_size(b) for a, b in zip(shape, ctx.meta_shape(ctx.arg(0)))):
        return Value(list(v.atoms), [], None, False)  # *_like: the input's dims
    return Value([ctx.spaces.new(s) for s in shape], [], None, False)


@rule(aten.item.default, aten._local_scalar_dense.default)
def _to_scalar(ctx: RuleContext):
    """A value read out as a Python scalar flows where no space follows it: pin its dims."""
    v = ctx.input(0)
    for a in v.atoms:
        _mixed(ctx, a, "read out as a scalar")
    return None

