"""Dimension rules for the ATen ops (and transformers' custom ops) that LLM graphs use.

Each rule says how the index spaces of an op's inputs relate to those of its outputs; see
``registry.py`` for the contract and ``spaces.py`` for unify / factorise / concatenate.
"""

from __future__ import annotations

import operator

import torch

from prunegraph.ir.analysis.registry import RuleContext, Value, rule
from prunegraph.ir.analysis.spaces import Conflict, as_size


class _OptionalOps:
    """``aten.name.overload`` that is None when this torch build lacks the op (rules skip it)."""

    def __init__(self, packet=None):
        self._packet = packet

    def __getattr__(self, name):
        if self._packet is None:
            return _OptionalOps(getattr(torch.ops.aten, name, None) or _MISSING)
        return getattr(self._packet, name, None) if self._packet is not _MISSING else None


_MISSING = object()


aten = _OptionalOps()


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _carry(v: Value, atoms=None, keep_origins: bool = True) -> Value:
    return Value(list(v.atoms if atoms is None else atoms),
                 list(v.origins) if keep_origins else [], v.value_space, v.param_dep)


# ---- identity-like ------------------------------------------------------------------------
@rule(aten.silu.default, aten.gelu.default, aten.tanh.default, aten.neg.default,
      aten.relu.default, aten.sigmoid.default, aten.exp.default, aten.log.default,
      aten.rsqrt.default, aten.sqrt.default, aten.abs.default, aten.pow.Tensor_Scalar,
      aten.dropout.default, aten.alias.default, aten.contiguous.default, aten.clone.default,
      aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
      aten._to_copy.default, aten.type_as.default, aten.float.default, aten.gelu_.default,
      aten.silu_.default, aten.relu_.default, aten.lift_fresh_copy.default, aten.clamp.default,
      aten.ne.Scalar, aten.eq.Scalar, aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar,
      aten.le.Scalar, aten.bitwise_not.default, aten.logical_not.default, aten.sin.default,
      aten.cos.default, aten.erf.default, aten.reciprocal.default, aten.sign.default)
def _unary(ctx: RuleContext) -> Value:
    """Same dims in and out. Only value-preserving ops (dtype casts, copies) stay views of a
    parameter: a matmul with ``exp(A_log)`` is not a place a gate on ``A_log`` can fold into."""
    return _carry(ctx.input(0), keep_origins=ctx.node.target in _VALUE_PRESERVING)


_VALUE_PRESERVING = {op for op in (
    aten.dropout.default, aten.alias.default, aten.contiguous.default, aten.clone.default,
    aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.type_as.default, aten.float.default,
    aten.lift_fresh_copy.default) if op is not None}


def _is_tensor(ctx: RuleContext, a) -> bool:
    return ctx.value(a) is not None


_PRODUCTS = (aten.mul.Tensor, aten.mul_.Tensor, aten.multiply.Tensor)


@rule(aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.div_.Tensor,
      aten.mul_.Tensor, aten.add_.Tensor, aten.where.self, aten.maximum.default,
      aten.minimum.default, aten.eq.Tensor, aten.ne.Tensor, aten.gt.Tensor, aten.lt.Tensor,
      aten.ge.Tensor, aten.le.Tensor, aten.__and__.Tensor, aten.__or__.Tensor,
      aten.logical_and.default, aten.logical_or.default, aten.floor_divide.default,
      aten.remainder.Tensor, aten.remainder.Scalar, aten.mul.Scalar, aten.add.Scalar,
      aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Tensor, aten.masked_fill.Scalar,
      aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.copy_.default,
      aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.rsub.Scalar, operator.mul,
      operator.add, operator.sub, operator.truediv, operator.floordiv,
      # aliases and forms PyTorch does not tag pointwise
      aten.multiply.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
      aten.log_sigmoid.default)
def _broadcast(ctx: RuleContext) -> Value:
    """Elementwise with broadcasting: equal dims unify, size-1 dims broadcast."""
    shape = ctx.meta_shape()
    ins = ctx.tensor_inputs()
    if not ins:
        return Value(ctx.fresh(shape))
    ndim = len(shape)
    atoms: list[int | None] = [None] * ndim
    for a, v in ins:
        in_shape = ctx.meta_shape(a)
        off = ndim - len(in_shape)
        for d, s in enumerate(in_shape):
            o = d + off
            if as_size(s) == 1 and as_size(shape[o]) != 1:
                continue
            known = atoms[o]
            if known is None:
                atoms[o] = v.atoms[d]
            else:
                ctx.unify(known, v.atoms[d], "elementwise operands disagree")
        # a 1-D parameter multiplying / adding along a dim is a norm weight / bias
        for d in range(len(in_shape)):
            if v.origins[d] is not None:
                role = "norm" if ctx.node.target in _PRODUCTS else "bias"
                ctx.use(v, d, role)
    filled = [a if a is not None else ctx.spaces.new(shape[i]) for i, a in enumerate(atoms)]
    # arithmetic on index tensors no longer names the same entries: drop the value space; a
    # result computed from a parameter is no longer a view of it (origins only follow views)
    return Value(filled, [None] * ndim, None, any(v.param_dep for _, v in ins))


# ---- reductions, scans: see rules_families.py (the reduction family, cumsum and friends) ------
@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(ctx: RuleContext) -> Value:
    """Normalises over a dim: removing a unit changes every other unit's value, so the dim is
    pinned, unless it is a routed experts space (router logits come before the top-k)."""
    v = ctx.input(0)
    d = _norm_dim(ctx.arg(1), v.ndim)
    ctx.spaces.flag(v.atoms[d], "softmax", ctx.module)
    if ctx.spaces.static_size(v.atoms[d]) not in (None, 1):
        ctx.spaces.pin_unless_routed(v.atoms[d], f"normalised by a softmax ({ctx.node.name} in "
                                                 f"{ctx.module or 'the model'})")
    return _carry(v)


# ---- linear algebra -----------------------------------------------------------------------
@rule(aten.linear.default)
def _linear(ctx: RuleContext) -> Value:
    x, w = ctx.input(0), ctx.input(1)
    b = ctx.value(ctx.arg(2))
    ctx.unify(x.atoms[-1], w.atoms[1], "linear input features")
    ctx.use(w, 1, "consumer")
    ctx.use(w, 0, "producer")
    if b is not None:
        ctx.unify(b.atoms[0], w.atoms[0], "linear bias")
        ctx.use(b, 0, "bias")
    return Value(x.atoms[:-1] + [w.atoms[0]], x.origins[:-1] + [None], None, True)


@rule(aten.addmm.default)
def _addmm(ctx: RuleContext) -> Value:
    b, x, w = ctx.input(0), ctx.input(1), ctx.input(2)
    ctx.unify(x.atoms[-1], w.atoms[0], "matmul contraction")
    ctx.use(w, 0, "consumer")
    ctx.use(w, 1, "producer")
    ctx.unify(b.atoms[-1], w.atoms[1], "addmm bias")
    ctx.use(b, b.ndim - 1, "bias")
    return Value([x.atoms[0], w.atoms[1]], [], None, True)


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(ctx: RuleContext) -> Value:
    a, b = ctx.input(0), ctx.input(1)
    shape = ctx.meta_shape()
    if a.ndim < 2 or b.ndim < 2:
        raise NotImplementedError("matmul with a 1-D operand")
    ctx.unify(a.atoms[-1], b.atoms[-2], "matmul contraction")
    ctx.use(a, a.ndim - 1, "consumer")
    ctx.use(b, b.ndim - 2, "consumer")
    ctx.use(a, a.ndim - 2, "producer")
    ctx.use(b, b.ndim - 1, "producer")
    if a.origins[-1] is None and b.origins[-2] is None and \
            ctx.spaces.static_size(a.atoms[-1]) not in (None, 1):
        # two activations contracted (q @ k^T): no parameter slice is a gate site for it
        ctx.spaces.pin_unless_routed(a.atoms[-1], f"contracted between activations "
                                                  f"({ctx.node.name} in {ctx.module or 'the model'})")
    batch = len(shape) - 2
    atoms: list[int] = []
    for i in range(batch):
        cands = []
        for v in (a, b):
            j = i - (batch - (v.ndim - 2))
            if j >= 0 and as_size(ctx.meta_shape(ctx.arg(0 if v is a else 1))[j]) != 1:
                cands.append(v.atoms[j])
        if not cands:
            atoms.append(ctx.spaces.new(shape[i]))
            continue
        for c in cands[1:]:
            ctx.unify(cands[0], c, "matmul batch dims")
        atoms.append(cands[0])
    return Value(atoms + [a.atoms[-2], b.atoms[-1]], [], None, True)


@rule(aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa(ctx: RuleContext):
    q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
    for i in range(q.ndim - 3):
        ctx.unify(q.atoms[i], k.atoms[i], "attention batch dims")
        ctx.unify(k.atoms[i], v.atoms[i], "attention batch dims")
    hq, hk = q.atoms[-3], k.atoms[-3]
    ctx.unify(hk, v.atoms[-3], "key and value heads")
    if ctx.spaces.size(hq) == ctx.spaces.size(hk):
        ctx.unify(hq, hk, "query and key heads")
    else:  # enable_gqa: query heads = kv heads x queries per kv head
        try:
            kv, rep = ctx.spaces.split_prod(ctx.spaces.new(ctx.spaces.size(hq)), ctx.spaces.size(hk))
            ctx.spaces.flag(rep, "replica", ctx.node.name)
        except Conflict:
            ctx.pin(hq, "query heads do not group evenly over kv heads")
        else:
            parent = ctx.spaces.new(ctx.spaces.size(hq))
            ctx.spaces.define(parent, "prod", [kv, rep])
            ctx.unify(hq, parent, "grouped-query attention")
            ctx.unify(kv, hk, "grouped-query attention")
    ctx.unify(q.atoms[-1], k.atoms[-1], "query/key head_dim")
    ctx.pin(q.atoms[-1], "head_dim: contracted in q.k with a scale set by its size")
    ctx.unify(k.atoms[-2], v.atoms[-2], "key/value sequence")
    # the mask / bias over (batch, heads, q, k): a learned bias per head (ALiBi slopes, relative
    # positions) must follow the heads it is added to
    mask = ctx.value(ctx.kwarg("attn_mask", 3))
    if mask is not None and mask.ndim == q.ndim:
        mshape = ctx.meta_shape(ctx.kwarg("attn_mask", 3))
        if as_size(mshape[-3]) != 1:
            ctx.unify(mask.atoms[-3], hq, "attention bias heads")
    out = [*q.atoms[:-1], v.atoms[-1]]
    if ctx.node.target is aten.scaled_dot_product_attention.default:
        return Value(out, [], None, True)
    rest = tuple(Value(ctx.fresh(getattr(t, "shape", []))) for t in ctx.node.meta["val"][1:])
    return (Value(out, [], None, True),) + rest


@rule(aten.embedding.default)
def _embedding(ctx: RuleContext) -> Value:
    """A table lookup. The table indexed by the model's token ids writes the hidden space;
    tables indexed by computed ids (relative-position buckets) are just producers."""
    w, ids = ctx.input(0), ctx.input(1)
    ctx.pin(w.atoms[0], "indexed by token ids")
    ctx.use(w, 0, "producer")
    ctx.use(w, 1, "producer")
    if _from_model_input(ctx.arg(1)):
        ctx.spaces.flag(w.atoms[1], "embedding", ctx.module)
    return Value(list(ids.atoms) + [w.atoms[1]], [], None, True)


_ID_PASSTHROUGH = {op for op in (aten.view.default, aten.reshape.default, aten.clamp.default,
                                 aten._to_copy.default, aten.to.dtype, aten.contiguous.default,
                                 aten.clone.default, aten.alias.default, aten.detach.default,
                                 aten.slice.Tensor, aten.squeeze.dim, aten.unsqueeze.default,
                                 aten.flatten.using_ints) if op is not None}


def _from_model_input(node) -> bool:
    """``node`` is a model input (not a parameter or buffer), seen through views and casts."""
    for _ in range(16):
        if not isinstance(node, torch.fx.Node):
            return False
        if node.op == "placeholder":
            kind = getattr(node.meta.get("val"), "dtype", None)
            return kind is not None and not kind.is_floating_point and not \
                node.name.startswith(("p_", "b_", "c_"))
        if node.op != "call_function" or node.target not in _ID_PASSTHROUGH:
            return False
        node = node.args[0]
    return False


@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
      aten.group_norm.default)
def _layer_norm(ctx: RuleContext):
    x = ctx.input(0)
    shape = ctx.arg(1)
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    for d in range(x.ndim - n, x.ndim):
        ctx.pin(x.atoms[d], "normalised over (the statistic changes if units are removed)")
    for i in (2, 3):
        p = ctx.value(ctx.arg(i))
        if p is not None:
            for j in range(p.ndim):
                ctx.unify(p.atoms[j], x.atoms[x.ndim - p.ndim + j], "norm weight")
                ctx.use(p, j, "norm" if i == 2 else "bias")
    out = _carry(x, keep_origins=False)
    if ctx.node.target is aten.native_layer_norm.default:
        return (out, Value(ctx.fresh(ctx.node.meta["val"][1].shape)),
                Value(ctx.fresh(ctx.node.meta["val"][2].shape)))
    return out


# ---- shape ops ----------------------------------------------------------------------------
@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
      aten.unflatten.int, aten.view_copy.default)
def _reshape(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    out_shape = [as_size(s) for s in ctx.meta_shape()]
    sp = ctx.spaces
    leaves: list[int] = []
    for a in v.atoms:
        leaves.extend(sp.factors(a))
    out: list[int] = []
    origins: list = []
    i = 0
    try:
        for k, size in enumerate(out_shape):
            if size == 1:
                nxt = out_shape[k + 1] if k + 1 < len(out_shape) else None
                if (nxt is not None and i < len(leaves) and sp.static_size(leaves[i]) not in (None, 1)
                        and sp.size(leaves[i]) == nxt and sp.defn(leaves[i]) is None):
                    # [.., N] -> [.., 1, N]: a real axis of extent 1 (MQA's single kv head)
                    one, rest = sp.split_prod(leaves[i], 1)
                    sp.flag(one, "unit", ctx.node.name)
                    leaves[i] = rest
                    out.append(one)
                else:
                    out.append(sp.new(1))
                origins.append(None)
                continue
            parts: list[int] = []
            acc = as_size(1)
            while acc != size:
                if i >= len(leaves):
                    raise Conflict("reshape consumes more than its input")
                leaf = leaves[i]
                lsz = sp.size(leaf)
                need = size / acc
                if lsz == need or _fits(lsz, need):
                    parts.append(leaf)
                    acc = acc * lsz
                    i += 1
                else:  # the leaf is larger than what this output dim needs: split it
                    first, rest = sp.split_prod(leaf, need)
                    parts.append(first)
                    acc = acc * need
                    leaves[i] = rest
            if len(parts) == 1:
                out.append(parts[0])
            else:
                merged = sp.new(size)
                sp.define(merged, "prod", parts)
                out.append(merged)
            origins.append(None)
        if any(sp.size(x) != 1 for x in leaves[i:]):
            raise Conflict("reshape leaves input unconsumed")
    except Conflict as e:
        peeled = _reshape_token_dims_only(ctx, v, out_shape)
        if peeled is not None:
            return peeled
        for a in v.atoms:
            ctx.pin(a, f"reshape that mixes spaces ({e})")
        out = [sp.new(s, pinned=f"reshape that mixes spaces at {ctx.node.name}") for s in out_shape]
        origins = [None] * len(out)
    # a view that keeps every dim keeps the parameter origins
    if [sp.find(a) for a in v.atoms] == [sp.find(a) for a in out]:
        origins = list(v.origins)
    return Value(out, origins, v.value_space, v.param_dep)


def _reshape_token_dims_only(ctx: RuleContext, v: Value, out_shape: list) -> Value | None:
    """A reshape whose static dims are kept whole at both ends and whose middle only regroups
    token dims (``[b, L, h, p] -> [b, chunks, L / chunks, h, p]`` with symbolic ``L``): the
    kept dims pass through, the middle ones are new token dims. None if it is not of that form."""
    sp = ctx.spaces
    n_in, n_out = v.ndim, len(out_shape)
    head = 0
    while head < min(n_in, n_out) and sp.size(v.atoms[head]) == out_shape[head] and \
            sp.static_size(v.atoms[head]) is not None:
        head += 1
    tail = 0
    while tail < min(n_in, n_out) - head and \
            sp.size(v.atoms[n_in - 1 - tail]) == out_shape[n_out - 1 - tail] and \
            sp.static_size(v.atoms[n_in - 1 - tail]) is not None:
        tail += 1
    middle_in = v.atoms[head:n_in - tail]
    middle_out = out_shape[head:n_out - tail]
    symbolic = lambda size: not getattr(size, "is_Integer", False) or size == 1  # noqa: E731
    if not all(symbolic(sp.size(a)) for a in middle_in) or not all(symbolic(s) for s in middle_out):
        return None
    atoms = v.atoms[:head] + [sp.new(s) for s in middle_out] + v.atoms[n_in - tail:]
    origins = v.origins[:head] + [None] * len(middle_out) + v.origins[n_in - tail:]
    return Value(atoms, origins, v.value_space, v.param_dep)


def _fits(leaf_size, need) -> bool:
    """The leaf divides what is still needed (so it is consumed whole)."""
    from prunegraph.ir.analysis.spaces import _divides

    return _divides(leaf_size, need) is not None and leaf_size != need and (
        not getattr(need, "is_Integer", False) or int(need) % int(leaf_size) == 0
        if getattr(leaf_size, "is_Integer", False) else True)


@rule(aten.transpose.int, aten.t.default, aten.permute.default, aten.swapaxes.default,
      aten.numpy_T.default, aten.mT.default, aten.adjoint.default, aten.permute_copy.default,
      aten.transpose_copy.int, aten.t_copy.default, aten.movedim.int)
def _permute(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    n = v.ndim
    target = ctx.node.target
    if target in (aten.permute.default, aten.permute_copy.default):
        order = [_norm_dim(d, n) for d in ctx.arg(1)]
    elif target is aten.numpy_T.default:
        order = list(reversed(range(n)))
    elif target is aten.movedim.int:
        order = list(range(n))
        src, dst = _norm_dim(ctx.arg(1), n), _norm_dim(ctx.arg(2), n)
        order.insert(dst, order.pop(src))
    elif target in (aten.mT.default, aten.adjoint.default):
        order = list(range(n))
        order[-1], order[-2] = order[-2], order[-1]
    else:
        a, b = (0, 1) if target in (aten.t.default, aten.t_copy.default) else (ctx.arg(1), ctx.arg(2))
        order = list(range(n))
        a, b = _norm_dim(a, n), _norm_dim(b, n)
        order[a], order[b] = order[b], order[a]
    return Value([v.atoms[i] for i in order], [v.origins[i] for i in order], v.value_space, v.param_dep)


@rule(aten.unsqueeze.default)
def _unsqueeze(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    d = _norm_dim(ctx.arg(1), v.ndim + 1)
    return Value(v.atoms[:d] + [ctx.spaces.new(1)] + v.atoms[d:],
                 v.origins[:d] + [None] + v.origins[d:], v.value_space, v.param_dep)


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    shape = ctx.meta_shape(ctx.arg(0))
    dims = ctx.arg(1)
    if dims is None:
        dims = [i for i, s in enumerate(shape) if as_size(s) == 1]
    elif isinstance(dims, int):
        dims = [dims]
    drop = {_norm_dim(d, v.ndim) for d in dims if as_size(shape[_norm_dim(d, v.ndim)]) == 1}
    keep = [i for i in range(v.ndim) if i not in drop]
    return Value([v.atoms[i] for i in keep], [v.origins[i] for i in keep], v.value_space, v.param_dep)


@rule(aten.expand.default, aten.expand_copy.default, aten.repeat.default)
def _expand(ctx: RuleContext) -> Value:
    """Broadcast size-1 dims: the new extent is a fresh *replica* space (GQA's repeat_kv)."""
    v = ctx.input(0)
    out_shape = ctx.meta_shape()
    in_shape = ctx.meta_shape(ctx.arg(0))
    off = len(out_shape) - v.ndim
    atoms, origins = [], []
    for o, s in enumerate(out_shape):
        d = o - off
        if d >= 0 and as_size(in_shape[d]) == as_size(s) and ctx.node.target is not aten.repeat.default:
            atoms.append(v.atoms[d])
            origins.append(v.origins[d])
        elif (d >= 0 and ctx.node.target is aten.repeat.default and as_size(in_shape[d]) != 1
              and as_size(s) != as_size(in_shape[d])):
            rep = ctx.spaces.new(as_size(s) / as_size(in_shape[d]), replica=ctx.node.name)
            merged = ctx.spaces.new(s)
            ctx.spaces.define(merged, "prod", [rep, v.atoms[d]])
            atoms.append(merged)
            origins.append(None)
        elif d >= 0 and as_size(in_shape[d]) == as_size(s):
            atoms.append(v.atoms[d])
            origins.append(v.origins[d])
        else:
            atoms.append(ctx.spaces.new(s, replica=ctx.node.name))
            origins.append(None)
    return Value(atoms, origins, v.value_space, v.param_dep)


@rule(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    reps = ctx.arg(1)
    d = _norm_dim(ctx.kwarg("dim", 2, 0), v.ndim)
    shape = ctx.meta_shape()
    rep = ctx.spaces.new(reps, replica=ctx.node.name)
    merged = ctx.spaces.new(shape[d])
    ctx.spaces.define(merged, "prod", [v.atoms[d], rep])
    atoms = list(v.atoms)
    atoms[d] = merged
    return Value(atoms, [], v.value_space, v.param_dep)


def _cut(ctx: RuleContext, atom: int, start, length) -> int:
    """The sub-space ``[start, start + length)`` of ``atom``, refining it into segments."""
    sp = ctx.spaces
    size = sp.size(atom)
    start, length = as_size(start), as_size(length)
    if start == 0 and length == size:
        return atom
    if not (getattr(size, "is_Integer", False)):
        return sp.new(length)  # slicing a token dim: unrelated to parameter spaces
    if not (getattr(start, "is_Integer", False) and getattr(length, "is_Integer", False)):
        raise Conflict("a slice of a fixed-size space with bounds known only at run time")
    segs = sp.segments(atom)
    pos = as_size(0)
    bounds = []
    for s in segs:
        bounds.append((pos, s))
        pos += sp.size(s)
    for cut in (start, start + length):
        pos = as_size(0)
        for idx, s in enumerate(list(segs)):
            sz = sp.size(s)
            if pos < cut < pos + sz:
                a, b = sp.split_cat(s, cut - pos)
                segs[idx:idx + 1] = [a, b]
                break
            pos += sz
    pos = as_size(0)
    chosen = []
    for s in segs:
        if start <= pos and pos + sp.size(s) <= start + length:
            chosen.append(s)
        pos += sp.size(s)
    if len(chosen) == 1:
        return chosen[0]
    merged = sp.new(length)
    sp.define(merged, "cat", chosen)
    return merged


def _cut_or_pin(ctx: RuleContext, atom: int, start, length) -> int:
    """:func:`_cut`, or, where the range cuts across a structured space's units, a new pinned
    space (and the sliced one pinned): such a slice can never be sliced consistently."""
    try:
        return _cut(ctx, atom, start, length)
    except Conflict as e:
        ctx.pin(atom, f"slice of a structured space ({e})")
        return ctx.spaces.new(length, pinned="slice of a structured space")


@rule(aten.slice.Tensor)
def _slice(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    d = _norm_dim(ctx.arg(1, 0), v.ndim)
    in_size = as_size(ctx.meta_shape(ctx.arg(0))[d])
    out_size = as_size(ctx.meta_shape()[d])
    start = ctx.arg(2, 0) or 0
    step = ctx.arg(4, 1) or 1
    atoms = list(v.atoms)
    origins = list(v.origins)
    if out_size == in_size:
        return Value(atoms, origins, v.value_space, v.param_dep)
    if step != 1 or not isinstance(start, int) or not getattr(out_size, "is_Integer", False) \
            or not getattr(in_size, "is_Integer", False):
        # strided, or bounds known only at run time (``Min(N, s)``): no segment to name
        if getattr(in_size, "is_Integer", False):
            ctx.pin(v.atoms[d], "strided or data-dependent slice")
        atoms[d] = ctx.spaces.new(out_size, **({"pinned": "strided or data-dependent slice"}
                                                if getattr(out_size, "is_Integer", False) else {}))
    else:
        if start < 0:
            start = int(in_size) + start
        atoms[d] = _cut_or_pin(ctx, v.atoms[d], start, out_size)
    origins[d] = None
    return Value(atoms, origins, v.value_space, v.param_dep)


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
      aten.unsafe_split.Tensor, aten.tensor_split.sections)
def _split(ctx: RuleContext):
    v = ctx.input(0)
    outs = ctx.node.meta["val"]
    d = ctx.kwarg("dim", 2, 0)
    d = _norm_dim(d, v.ndim)
    results = []
    start = 0
    for t in outs:
        length = as_size(t.shape[d])
        atoms = list(v.atoms)
        try:
            atoms[d] = _cut(ctx, v.atoms[d], start, length)
        except Conflict as e:
            ctx.pin(v.atoms[d], f"split of a structured space ({e})")
            atoms[d] = ctx.spaces.new(length, pinned="split of a structured space")
        origins = list(v.origins)
        origins[d] = None
        results.append(Value(atoms, origins, v.value_space, v.param_dep))
        start = start + length
    return tuple(results)


@rule(aten.cat.default, aten.concat.default, aten.concatenate.default)
def _cat(ctx: RuleContext) -> Value:
    tensors = ctx.arg(0)
    shape = ctx.meta_shape()
    d = _norm_dim(ctx.kwarg("dim", 1, 0), len(shape))
    vals = [(t, v) for t in tensors
            if (v := ctx.value(t)) is not None and len(ctx.meta_shape(t)) == len(shape)]
    atoms = []
    for i in range(len(shape)):
        if i == d:
            parts = [v.atoms[i] for _, v in vals if as_size(ctx.meta_shape(_)[i]) != 0]
            if len(parts) == 1:
                atoms.append(parts[0])
            else:
                merged = ctx.spaces.new(shape[i])
                ctx.spaces.define(merged, "cat", parts)
                atoms.append(merged)
        else:
            first = vals[0][1].atoms[i]
            for _, v in vals[1:]:
                ctx.unify(first, v.atoms[i], "concatenated tensors")
            atoms.append(first)
    return Value(atoms, [], None, any(v.param_dep for _, v in vals))


@rule(operator.getitem)
def _getitem(ctx: RuleContext):
    src = ctx.values.get(ctx.arg(0).name)
    if isinstance(src, tuple):
        return src[ctx.arg(1)]
    raise NotImplementedError("getitem on a non-tuple value")


# ---- routing (MoE) --------------------------------------------------------------------------
@rule(aten.topk.default)
def _topk(ctx: RuleContext):
    v = ctx.input(0)
    k = ctx.arg(1)
    d = _norm_dim(ctx.kwarg("dim", 2, -1), v.ndim)
    sel = v.atoms[d]
    ctx.spaces.flag(sel, "topk", str(k))
    # the largest units are picked: removing one changes the pick, unless the space is routed
    # (the ids select experts' weights; removing an expert masks its router logit)
    if ctx.spaces.static_size(sel) not in (None, 1):
        ctx.spaces.pin_unless_routed(sel, f"top-k picked over ({ctx.node.name} in "
                                          f"{ctx.module or 'the model'})")
    atoms = list(v.atoms)
    atoms[d] = ctx.spaces.new(k, pinned=f"top-k slots ({ctx.node.name})")
    return (Value(list(atoms), [], None, True), Value(list(atoms), [], sel, True))


@rule(aten.sort.default, aten.sort.stable)
def _sort(ctx: RuleContext):
    v = ctx.input(0)
    d = _norm_dim(ctx.kwarg("dim", 1, -1), v.ndim)
    if ctx.spaces.static_size(v.atoms[d]) not in (None, 1):
        ctx.spaces.pin_unless_routed(v.atoms[d], f"sorted over ({ctx.node.name})")
    atoms = list(v.atoms)
    return (Value(atoms, [], v.value_space, True), Value(list(atoms), [], None, True))


@rule(aten.histc.default)
def _histc(ctx: RuleContext) -> Value:
    v = ctx.input(0)
    bins = ctx.kwarg("bins", 1, 100)
    if v.value_space is not None and ctx.spaces.size(v.value_space) == bins:
        ctx.spaces.flag(v.value_space, "routed", ctx.node.name)
        return Value([v.value_space], [], None, True)
    for a in v.atoms:  # a histogram of plain values mixes every entry
        if ctx.spaces.static_size(a) not in (None, 1):
            ctx.pin(a, "counted into a histogram")
    return Value([ctx.spaces.new(bins, pinned=f"histogram bins ({ctx.node.name})")], [], None, True)


@rule(aten.index.Tensor)
def _index(ctx: RuleContext) -> Value:
    """``x[idx0, idx1, ...]``: indexed dims are replaced by the index tensors' dims."""
    x = ctx.input(0)
    indices = ctx.arg(1)
    shape = ctx.meta_shape()
    idx_vals = {d: v for d, i in enumerate(indices) if (v := ctx.value(i)) is not None}
    present = sorted(idx_vals)
    if not present:
        return _carry(x)
    masks = [d for d in present if getattr(indices[d].meta.get("val"), "dtype", None) == torch.bool]
    if masks:
        # boolean masks select a data-dependent set of entries: every masked dim is mixed
        d0 = masks[0]
        n = len(ctx.meta_shape(indices[d0]))
        for a in x.atoms[d0:d0 + n]:
            if ctx.spaces.static_size(a) not in (None, 1):
                ctx.pin(a, "selected by a boolean mask")
        if len(masks) == 1 and present == [d0] and len(shape) == x.ndim - n + 1:
            atoms = x.atoms[:d0] + [ctx.spaces.new(shape[d0])] + x.atoms[d0 + n:]
            origins = x.origins[:d0] + [None] + x.origins[d0 + n:]
            return Value(atoms, origins, x.value_space, x.param_dep)
        raise NotImplementedError("boolean masks mixed with other indices")
    for d in present:
        iv = idx_vals[d]
        if iv.value_space is not None:
            ctx.unify(x.atoms[d], iv.value_space, "gathered by routed index")
            ctx.spaces.flag(x.atoms[d], "routed", ctx.node.name)
        elif ctx.spaces.static_size(x.atoms[d]) not in (None, 1):
            ctx.pin(x.atoms[d], "gathered by a data-dependent index")
    first, last = present[0], present[-1]
    idx_ndim = len(shape) - (x.ndim - len(present))
    idx_shapes = {tuple(as_size(s) for s in ctx.meta_shape(indices[d])) for d in present}
    idx_atoms = ctx.fresh(shape[first:first + idx_ndim], pinned=f"indexed ({ctx.node.name})")
    if len(idx_shapes) == 1 and idx_vals[first].ndim == idx_ndim:
        idx_atoms = list(idx_vals[first].atoms)  # out[i, j] = x[idx[i, j]]: the index's dims
        for d in present[1:]:
            for a, b in zip(idx_atoms, idx_vals[d].atoms):
                ctx.unify(a, b, "index tensors")
    lead = x.atoms[:first]
    tail = x.atoms[last + 1:]
    atoms = lead + idx_atoms + tail
    origins = x.origins[:first] + [None] * len(idx_atoms) + x.origins[last + 1:]
    if len(atoms) != len(shape) or present != list(range(first, last + 1)):
        for a in x.atoms:  # advanced indexing with gaps moves dims: keep nothing, pin inputs
            if ctx.spaces.static_size(a) not in (None, 1):
                ctx.pin(a, "indexed in a layout the rule does not follow")
        atoms, origins = ctx.fresh(shape, pinned=f"indexed ({ctx.node.name})"), []
    # the values of an indexed index tensor still name the same space
    return Value(atoms, origins, x.value_space, x.param_dep)


@rule(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default)
def _like(ctx: RuleContext) -> Value:
    """Fresh tensors shaped like the input: same dims, no values carried."""
    v = ctx.input(0)
    shape = ctx.meta_shape()
    in_shape = ctx.meta_shape(ctx.arg(0))
    if len(shape) == v.ndim and all(as_size(a) == as_size(b) for a, b in zip(shape, in_shape)):
        return Value(list(v.atoms), [], None, False)
    return Value(ctx.fresh(shape))


@rule(aten.diff.default)
def _diff(ctx: RuleContext) -> Value:
    """Differences of neighbours along a dim: that dim is mixed, the others pass through."""
    v = ctx.input(0)
    d = _norm_dim(ctx.kwarg("dim", 2, -1), v.ndim)
    static = ctx.spaces.static_size(v.atoms[d]) not in (None, 1)
    if static:
        ctx.pin(v.atoms[d], "differenced along")
    atoms = list(v.atoms)
    atoms[d] = ctx.spaces.new(ctx.meta_shape()[d], **({"pinned": "differenced along"} if static else {}))
    return Value(atoms, [], None, v.param_dep)


def _grouped_mm(ctx: RuleContext) -> Value:
    """``out[s] = x[s] @ w[e(s)]`` for the rows ``s`` of expert ``e`` (given by offsets)."""
    x, w, offs = ctx.input(0), ctx.input(1), ctx.value(ctx.kwarg("offs", 2))
    ctx.unify(x.atoms[-1], w.atoms[-2], "grouped matmul contraction")
    ctx.use(w, w.ndim - 2, "consumer")
    ctx.use(w, w.ndim - 1, "producer")
    if offs is not None and w.ndim == 3:
        ctx.unify(offs.atoms[0], w.atoms[0], "grouped matmul groups")
        ctx.use(w, 0, "producer")
    return Value([x.atoms[0], w.atoms[-1]], [], None, True)


rule(aten._grouped_mm.default)(_grouped_mm)
try:  # transformers' custom op for grouped experts (registered when transformers is imported)
    import transformers.integrations.moe  # noqa: F401

    rule(torch.ops.transformers.grouped_mm_fallback.default)(_grouped_mm)
except (ImportError, AttributeError):  # pragma: no cover - older transformers
    pass


@rule(aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
      aten._assert_tensor_metadata.default, aten._assert_scalar.default,
      aten.sym_constrain_range_for_size.default)
def _scalar(ctx: RuleContext):
    return None
