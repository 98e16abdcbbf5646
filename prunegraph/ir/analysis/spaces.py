"""Index spaces: union-find over tensor dimensions, with factorisation and concatenation.

Every tensor dim in the graph is an *atom*: an index space of a known size (an int, or a sympy
expression for batch and sequence dims). Op rules relate atoms:

* ``unify(a, b)``: the two dims index the same things (elementwise ops, a linear's input).
* a *product* definition ``a := prod(b, c)``: ``view``/``reshape`` splitting 576 into 9 x 64
  (outer first), or GQA's ``repeat_kv`` making 9 query heads = 3 kv heads x 3.
* a *concatenation* definition ``a := cat(b, c)``: ``slice``/``chunk``/``cat`` cutting a fused
  ``gate_up_proj`` into its halves, or rotate-half in RoPE.

Unifying two defined atoms aligns their definitions, refining leaves where needed (``[9, 64]``
against ``[3, 3, 64]`` splits the 9). Whatever cannot be aligned exactly is *pinned* with a reason,
never silently merged: pinning is always safe (the space is simply not pruned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import sympy

__all__ = ["Spaces", "Size", "as_size", "is_static"]

Size: TypeAlias = sympy.Expr


def as_size(value) -> Size:
    """A dim size as a sympy expression (ints stay exact, SymInts become their expression).

    An FX node standing for a size (``sym_size``, arithmetic on sizes) is read through the
    value torch.export recorded for it; a size known only at run time becomes a fresh symbol,
    so the algebra never fails on it (it just relates it to nothing).
    """
    if isinstance(value, bool):
        return sympy.Integer(int(value))
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, sympy.Basic):
        return value
    node = getattr(value, "node", None)
    if node is not None and hasattr(node, "expr"):
        expr = node.expr
        env = getattr(node, "shape_env", None)
        if env is not None:  # facts learnt later in the trace (a guard made chunks == 1)
            try:
                expr = env.simplify(expr)
            except Exception:  # a shape env that cannot simplify it: keep the expression
                pass
        return sympy.sympify(expr)
    meta = getattr(value, "meta", None)
    if isinstance(meta, dict):  # a torch.fx.Node
        val = meta.get("val")
        if val is not None and not hasattr(val, "shape"):
            return as_size(val)
        return sympy.Symbol(f"runtime_{getattr(value, 'name', 'size')}", positive=True, integer=True)
    try:
        return sympy.sympify(value)
    except (sympy.SympifyError, TypeError):
        return sympy.Symbol(f"runtime_{id(value)}", positive=True, integer=True)


def is_static(size) -> bool:
    """Whether a size is a plain integer (not a batch / sequence / data-dependent expression)."""
    return bool(getattr(as_size(size), "is_Integer", False))


def _is_static(size: Size) -> bool:
    return bool(getattr(size, "is_Integer", False))


def _divides(small: Size, big: Size) -> Size | None:
    """``big / small`` if it is exact (integer or a monomial with no fraction), else None."""
    if small == 0:
        return None
    try:
        q = sympy.cancel(big / small)
        num, den = sympy.fraction(q)
    except (TypeError, ValueError, sympy.PolynomialError):  # Min(N, s) and other non-polynomials
        return None
    if den != 1:
        return None
    if q.is_Integer and int(q) < 1:
        return None
    return q


@dataclass
class _Atom:
    size: Size
    parent: int
    defn: tuple[str, list[int]] | None = None
    flags: dict[str, str] = field(default_factory=dict)


class Spaces:
    """The union-find of atoms. Atom ids are ints; always compare roots (``find``)."""

    def __init__(self) -> None:
        self._atoms: list[_Atom] = []
        self._deferred: list[tuple[int, str]] = []

    # ---- basics -------------------------------------------------------------------------
    def new(self, size, **flags: str) -> int:
        i = len(self._atoms)
        self._atoms.append(_Atom(as_size(size), i, None, dict(flags)))
        return i

    def find(self, a: int) -> int:
        atoms = self._atoms
        root = a
        while atoms[root].parent != root:
            root = atoms[root].parent
        while atoms[a].parent != root:  # path compression
            atoms[a].parent, a = root, atoms[a].parent
        return root

    def size(self, a: int) -> Size:
        return self._atoms[self.find(a)].size

    def static_size(self, a: int) -> int | None:
        s = self.size(a)
        return int(s) if _is_static(s) else None

    def known_size(self, a: int) -> int:
        """The size of an atom the caller knows is static (a free unit's), else an error."""
        s = self.static_size(a)
        if s is None:
            raise ValueError(f"index space {a} has the dynamic size {self.size(a)}, not a static one")
        return s

    def defn(self, a: int) -> tuple[str, list[int]] | None:
        return self._atoms[self.find(a)].defn

    def flags(self, a: int) -> dict[str, str]:
        return self._atoms[self.find(a)].flags

    def flag(self, a: int, key: str, reason: str) -> None:
        self._atoms[self.find(a)].flags.setdefault(key, reason)

    def pin(self, a: int, reason: str) -> None:
        """Mark ``a`` (and everything it is made of) as not prunable."""
        for leaf in self.leaves(a):
            self.flag(leaf, "pinned", reason)
        self.flag(a, "pinned", reason)

    def routed(self, a: int) -> bool:
        """Chosen by ``topk`` and selected by the chosen ids (an experts space)."""
        flags = self.flags(a)
        return "topk" in flags and "routed" in flags

    def pin_unless_routed(self, a: int, reason: str) -> None:
        """Pin ``a`` at the end of propagation unless it turns out to be a routed experts space
        (chosen by ``topk``): a softmax or a sum over experts comes before or after the top-k,
        and removing an expert masks its router logit, which both respect."""
        self._deferred.append((a, reason))

    def resolve_deferred(self) -> None:
        for a, reason in self._deferred:
            if not self.routed(a):
                self.pin(a, reason)
        self._deferred.clear()

    def pinned(self, a: int) -> str | None:
        return self.flags(a).get("pinned")

    def __len__(self) -> int:
        return len(self._atoms)

    # ---- structure ----------------------------------------------------------------------
    def define(self, a: int, kind: str, parts: list[int]) -> None:
        """Give leaf ``a`` a definition (``prod`` or ``cat``) in terms of ``parts``."""
        root = self.find(a)
        atom = self._atoms[root]
        if atom.defn is None:
            atom.defn = (kind, list(parts))
        else:
            other = self.new(atom.size)
            self._atoms[other].defn = (kind, list(parts))
            self.unify(root, other)

    def factors(self, a: int) -> list[int]:
        """``a`` as a flat list of product factors (cat-defined atoms stay whole).

        Size-1 factors are dropped, except *unit* ones: a real axis of extent 1 such as the
        single kv head of multi-query attention, which GQA grouping must still see.
        """
        root = self.find(a)
        d = self._atoms[root].defn
        if d is not None and d[0] == "prod":
            out: list[int] = []
            for p in d[1]:
                out.extend(self.factors(p))
            return out
        if self.size(root) == 1 and "unit" not in self._atoms[root].flags:
            return []
        return [root]

    def segments(self, a: int) -> list[int]:
        """``a`` as a flat list of concatenated segments (prod-defined atoms stay whole)."""
        root = self.find(a)
        d = self._atoms[root].defn
        if d is not None and d[0] == "cat":
            out: list[int] = []
            for p in d[1]:
                out.extend(self.segments(p))
            return out
        return [root]

    def leaves(self, a: int) -> list[int]:
        root = self.find(a)
        d = self._atoms[root].defn
        if d is None:
            return [root]
        out: list[int] = []
        for p in d[1]:
            out.extend(self.leaves(p))
        return out

    def split_prod(self, a: int, first: Size) -> tuple[int, int]:
        """Refine leaf ``a`` into ``prod(x, y)`` with ``|x| = first``; return ``(x, y)``."""
        root = self.find(a)
        rest = _divides(first, self.size(root))
        if rest is None or self._atoms[root].defn is not None:
            raise _Conflict(f"cannot factor a space of size {self.size(root)} by {first}")
        x, y = self.new(first), self.new(rest)
        self._atoms[root].defn = ("prod", [x, y])
        self._inherit_pin(root)
        return x, y

    def split_cat(self, a: int, first: Size) -> tuple[int, int]:
        """Refine leaf ``a`` into ``cat(x, y)`` with ``|x| = first``; return ``(x, y)``."""
        root = self.find(a)
        if self._atoms[root].defn is not None:
            raise _Conflict(f"cannot cut a structured space of size {self.size(root)} at {first}")
        x, y = self.new(first), self.new(self.size(root) - first)
        self._atoms[root].defn = ("cat", [x, y])
        self._inherit_pin(root)
        return x, y

    # ---- unification --------------------------------------------------------------------
    def unify(self, a: int, b: int) -> None:
        """Declare that ``a`` and ``b`` index the same things; align their structure."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        A, B = self._atoms[ra], self._atoms[rb]
        if A.size != B.size:
            raise _Conflict(f"sizes differ: {A.size} vs {B.size}")
        if self._contains(ra, rb) or self._contains(rb, ra):
            # one is the other times size-1 unit axes (a single head): align, never link a
            # space to its own factor (that would make a cycle)
            self.align_prod(self.factors(ra), self.factors(rb))
            return
        da, db = A.defn, B.defn
        B.parent = ra
        for k, v in B.flags.items():
            A.flags.setdefault(k, v)
        if da is None:
            A.defn = db
            self._inherit_pin(ra)
            return
        if db is None:
            self._inherit_pin(ra)
            return
        self._inherit_pin(ra)
        if da[0] == "prod" or db[0] == "prod":
            if da[0] != db[0] and "cat" in (da[0], db[0]):
                # one side is a product, the other a concatenation: compare as products only
                # when the concatenation has one segment; otherwise the layouts differ.
                raise _Conflict("a factorised space meets a concatenated one")
            self.align_prod(self._flatten_prod(da), self._flatten_prod(db))
        else:
            self.align_cat(self._flatten_cat(da), self._flatten_cat(db))

    def _flatten_prod(self, d) -> list[int]:
        out: list[int] = []
        for p in d[1]:
            out.extend(self.factors(p))
        return out

    def _flatten_cat(self, d) -> list[int]:
        out: list[int] = []
        for p in d[1]:
            out.extend(self.segments(p))
        return out

    def align_prod(self, xs: list[int], ys: list[int]) -> None:
        """Unify two factor lists with the same total size, splitting factors where needed."""
        xs, ys = list(xs), list(ys)
        i = j = 0
        while i < len(xs) and j < len(ys):
            x, y = self.find(xs[i]), self.find(ys[j])
            sx, sy = self.size(x), self.size(y)
            if sx == 1 and sy == 1:
                self.unify(x, y)
                i += 1
                j += 1
                continue
            if sx == 1:
                i += 1
                continue
            if sy == 1:
                j += 1
                continue
            if sx == sy:
                self.unify(x, y)
                i += 1
                j += 1
            elif _divides(sx, sy) is not None and not self._is_prod(y):
                y1, y2 = self.split_prod(y, sx)
                self.unify(x, y1)
                ys[j] = y2
                i += 1
            elif _divides(sy, sx) is not None and not self._is_prod(x):
                x1, x2 = self.split_prod(x, sy)
                self.unify(x1, y)
                xs[i] = x2
                j += 1
            else:
                raise _Conflict(f"factors {sx} and {sy} do not nest")
        rest = [a for a in xs[i:] + ys[j:] if self.size(a) != 1]
        if rest:
            raise _Conflict("factor lists of different total size")

    def align_cat(self, xs: list[int], ys: list[int]) -> None:
        """Unify two segment lists with the same total size, cutting segments where needed."""
        xs, ys = list(xs), list(ys)
        i = j = 0
        while i < len(xs) and j < len(ys):
            x, y = self.find(xs[i]), self.find(ys[j])
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                self.unify(x, y)
                i += 1
                j += 1
            elif _is_static(sx) and _is_static(sy) and int(sx) < int(sy):
                y1, y2 = self.split_cat(y, sx)
                self.unify(x, y1)
                ys[j] = y2
                i += 1
            elif _is_static(sx) and _is_static(sy):
                x1, x2 = self.split_cat(x, sy)
                self.unify(x1, y)
                xs[i] = x2
                j += 1
            else:
                raise _Conflict("symbolic segments do not align")
        if i < len(xs) or j < len(ys):
            raise _Conflict("segment lists of different total size")

    def _inherit_pin(self, root: int) -> None:
        """A pinned space stays pinned in every piece it is later cut or factored into."""
        reason = self._atoms[root].flags.get("pinned")
        if reason is not None and self._atoms[root].defn is not None:
            for leaf in self.leaves(root):
                self.flag(leaf, "pinned", reason)

    def _contains(self, a: int, b: int) -> bool:
        """``b`` occurs inside ``a``'s definition (at any depth)."""
        d = self._atoms[a].defn
        if d is None:
            return False
        return any(self.find(p) == b or self._contains(self.find(p), b) for p in d[1])

    def _is_prod(self, a: int) -> bool:
        d = self.defn(a)
        return d is not None

    def try_unify(self, a: int, b: int, reason: str) -> bool:
        """``unify``, but pin both sides with ``reason`` instead of failing."""
        try:
            self.unify(a, b)
            return True
        except _Conflict as e:
            self.pin(a, f"{reason}: {e}")
            self.pin(b, f"{reason}: {e}")
            return False


class _Conflict(Exception):
    """Two layouts cannot be aligned exactly (handled by pinning, never shown to users)."""


Conflict = _Conflict
