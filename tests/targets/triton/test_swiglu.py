"""The fused SwiGLU kernels match the PyTorch reference on ragged pruned widths.

Tolerances (max abs error over the output, relative to ``scale = max(1, max|ref|)``, the
reference being fp32 math on the same rounded inputs): fp32 ``1e-5``; fp16/bf16 at most twice the
error of PyTorch eager in that dtype, with a floor of ``2e-3`` (fp16) / ``1.6e-2`` (bf16), since
the kernels round the intermediate to the input dtype like eager does.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunegraph.targets.triton.swiglu import (
    TOKEN_BUCKETS,
    bucket_index,
    choose_configs,
    swiglu,
    swiglu_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(T, H, I, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    wg = torch.randn(I, H, generator=g) / H**0.5
    wu = torch.randn(I, H, generator=g) / H**0.5
    wd = torch.randn(H, I, generator=g) / I**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, wg, wu, wd)]


def assert_matches(y, x, wg, wu, wd):
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = swiglu_reference(*(t.double() for t in (x, wg, wu, wd)))
    scale = max(1.0, ref.abs().max().item())
    err = (y.double() - ref).abs().max().item() / scale
    tol = FLOOR[x.dtype]
    if x.dtype != torch.float32:
        eager = (swiglu_reference(x, wg, wu, wd).double() - ref).abs().max().item() / scale
        tol = max(tol, 2 * eager)
    assert err <= tol, f"error {err:.3g} > {tol:.3g} ({x.dtype})"


@settings(max_examples=30, deadline=None)
@given(H=st.integers(1, 96), I=st.integers(1, 96), T=st.sampled_from([1, 3, 20]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_swiglu_matches_reference(device, H, I, T, dtype, seed):
    x, wg, wu, wd = make(T, H, I, dtype, device, seed)
    assert_matches(swiglu(x, wg, wu, wd), x, wg, wu, wd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
def test_every_bucket_config_at_odd_widths(device, dtype):
    """Each bucket's config (and every GEMM config at any token count, across several token
    blocks) matches the reference at odd widths; one token runs the GEMV config."""
    H, I = 45, 77
    for k, cfg in enumerate(choose_configs(H, I, dtype)):
        for T in ((1,) if cfg.kind == "gemv" else (1, 3, 37, 300)):
            x, wg, wu, wd = make(T, H, I, dtype, device, 10 * k + T)
            assert_matches(swiglu(x, wg, wu, wd, configs=cfg), x, wg, wu, wd)


@pytest.mark.parametrize("T", [1, 16, 130, 300])
def test_hopper_tiles_on_a_wider_odd_shape(device, T):
    """The Hopper table (bf16; unshrunk GEMM tiles where the shape allows) over several blocks
    in every direction: loop tails along H and I, token tails, grouped tile order."""
    H, I = 160, 203
    x, wg, wu, wd = make(T, H, I, torch.bfloat16, device, T)
    cfg = choose_configs(H, I, torch.bfloat16, capability=(9, 0))[bucket_index(T)]
    assert cfg.kind == ("gemv" if T == 1 else "gemm")
    assert_matches(swiglu(x, wg, wu, wd), x, wg, wu, wd)


def test_gemv_config_takes_one_token(device):
    x, wg, wu, wd = make(2, 16, 24, torch.float32, device, 0)
    gemv = choose_configs(16, 24, torch.float32)[0]
    with pytest.raises(ValueError, match="one token"):
        swiglu(x, wg, wu, wd, configs=gemv)


def test_empty_input(device):
    x, wg, wu, wd = make(1, 16, 24, torch.float32, device, 0)
    assert swiglu(x[:0], wg, wu, wd).shape == (0, 16)


def test_leading_dims_and_strided_weights(device):
    """x may be [B, S, H]; weights given as transposed views are made unit-stride."""
    x, wg, wu, wd = make(6, 40, 50, torch.float32, device, 3)
    x = x.reshape(2, 3, 40)
    wd_view = wd.t().contiguous().t()  # column-major [H, I]
    assert wd_view.stride(-1) != 1
    assert_matches(swiglu(x, wg, wu, wd_view), x, wg, wu, wd)
    assert_matches(swiglu(x[:1, :1], wg, wu, wd), x[:1, :1], wg, wu, wd)


def test_shape_mismatch_is_an_error(device):
    x, wg, wu, wd = make(2, 16, 24, torch.float32, device, 0)
    with pytest.raises(ValueError, match="nn.Linear layouts"):
        swiglu(x, wg, wu, wd.t())


@given(H=st.integers(1, 20000), I=st.integers(1, 60000), dtype=st.sampled_from(DTYPES),
       capability=st.sampled_from([None, (8, 0), (9, 0), (10, 0)]))
def test_config_choice_is_legal(H, I, dtype, capability):
    """One config per bucket; one token takes the GEMV kernels, more tokens the GEMM kernels;
    blocks are powers of two no larger than the (rounded-up) dimension, GEMM tiles >= 16
    (tl.dot's minimum)."""
    configs = choose_configs(H, I, dtype, capability)
    assert len(configs) == len(TOKEN_BUCKETS) and TOKEN_BUCKETS[0][0] == 1
    assert [c.kind for c in configs] == ["gemv"] + ["gemm"] * (len(TOKEN_BUCKETS) - 1)
    for c in configs:
        for v in (c.bt, c.bi, c.bh, c.dh, c.di, c.warps, c.dwarps, c.group):
            assert v >= 1 and v & (v - 1) == 0
        assert c.bi <= max(16, 2 * I) and c.di <= max(16, 2 * I)
        assert c.bh <= max(16, 2 * H) and c.dh <= max(16, 2 * H)
        if c.kind == "gemm":
            assert min(c.bt, c.bi, c.bh, c.dh, c.di) >= 16
    for (most, timed), k in zip(TOKEN_BUCKETS, range(len(TOKEN_BUCKETS))):
        assert bucket_index(timed) == k
        if most is not None:
            assert bucket_index(most) == k and bucket_index(most + 1) == k + 1
