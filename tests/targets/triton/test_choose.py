"""The per-shape Triton-or-PyTorch choice: made with a (fake) timer, recorded in the generated
module with its reasons, and obeyed by the module's launchers; deterministic without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from prunegraph.errors import PreconditionError
from prunegraph.targets.triton import choose
from prunegraph.targets.triton.choose import choose_plans, default_plan, timed_plan
from prunegraph.targets.triton.codegen import MLPShape, generate_source, load_module, write_module
from prunegraph.targets.triton.swiglu import TOKEN_BUCKETS, swiglu_reference

A = MLPShape("model.layers.0.mlp", 32, 45, torch.float32)
B = MLPShape("model.layers.1.mlp", 32, 29, torch.float32)


def _weights(shape: MLPShape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, I = shape.hidden, shape.intermediate
    return tuple(t.to(device) for t in (torch.randn(I, H, generator=g) / H**0.5,
                                        torch.randn(I, H, generator=g) / H**0.5,
                                        torch.randn(H, I, generator=g) / I**0.5))


class FakeTimer:
    """Triton 10 us and PyTorch 20 us, except where ``torch_wins`` says PyTorch is faster.
    Records every call and runs the function once (so a broken path would raise)."""

    def __init__(self, torch_wins: set[tuple[str, int]]):
        self.torch_wins = torch_wins
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, path, shape, tokens, fn):
        self.calls.append((path, shape.key, tokens))
        fn()
        if (shape.key, tokens) in self.torch_wins:
            return {"triton": 30.0, "torch": 20.0}[path]
        return {"triton": 10.0, "torch": 20.0}[path]


@pytest.mark.slow
def test_timed_choice_is_recorded_and_obeyed(tmp_path, device, monkeypatch):
    """B's bucket of 16 tokens and A's largest bucket go to PyTorch; everything else to
    Triton. The module says so (path, times, source) and its launchers dispatch accordingly."""
    torch_wins = {(B.key, 16), (A.key, TOKEN_BUCKETS[-1][1])}
    timer = FakeTimer(torch_wins)
    weights = {s.name: _weights(s, device, k) for k, s in enumerate((A, B))}
    plans = choose_plans([A, B], weights, timer=timer, mode="timed")
    # both paths timed at every bucket's representative token count, once per shape
    assert sorted(timer.calls) == sorted((p, s.key, t) for s in (A, B) for _, t in TOKEN_BUCKETS
                                         for p in ("torch", "triton"))
    for s in (A, B):
        for (most, tokens), c in zip(TOKEN_BUCKETS, plans[s.key]):
            want = "torch" if (s.key, tokens) in torch_wins else "triton"
            assert (c.max_tokens, c.path) == (most, want)
            assert f"T={tokens}" in c.why and "us" in c.why and c.source.startswith("timed on")

    mod = load_module(write_module([A, B], tmp_path / "k.py", plans))
    for s in (A, B):
        assert [entry[1] for entry in mod.PLANS[s.key]] == [c.path for c in plans[s.key]]
        assert [entry[3] for entry in mod.PLANS[s.key]] == [c.why for c in plans[s.key]]
    src = (tmp_path / "k.py").read_text()
    assert "1 < T <= 16      torch" in src and "T > 256          torch" in src

    torch_calls = []
    real_torch = mod._torch_swiglu
    monkeypatch.setattr(mod, "_torch_swiglu",
                        lambda *a: (torch_calls.append(a[0].shape), real_torch(*a))[1])
    for s in (A, B):
        wg, wu, wd = weights[s.name]
        for tokens in (1, 5, 16, 17, 300):
            x = torch.randn(tokens, s.hidden, device=device)
            torch_calls.clear()
            y = mod.LAYERS[s.name]["run"](x, wg, wu, wd)
            bucket = next(k for k, (most, _) in enumerate(TOKEN_BUCKETS)
                          if most is None or tokens <= most)
            assert bool(torch_calls) == (plans[s.key][bucket].path == "torch"), (s.key, tokens)
            torch.testing.assert_close(y, swiglu_reference(x, wg, wu, wd), rtol=1e-4,
                                       atol=1e-4)


def test_without_a_gpu_the_choice_is_triton_and_deterministic(device):
    weights = {s.name: _weights(s, "cpu") for s in (A, B)}
    plans = choose_plans([A, B], weights, mode="auto")  # CPU weights, no timer
    assert all(c.path == "triton" and "not timed" in c.why for p in plans.values() for c in p)
    assert plans == choose_plans([A, B], weights, mode="auto")
    again = choose_plans([A, B], weights, mode="auto")
    assert generate_source([A, B], plans) == generate_source([A, B], again)
    with pytest.raises(PreconditionError, match="CUDA GPU"):
        choose_plans([A, B], weights, mode="timed")


def test_a_triton_result_that_differs_takes_the_torch_path(device, monkeypatch):
    wg, wu, wd = _weights(A, device)
    monkeypatch.setattr(choose, "swiglu", lambda x, *a, **k: torch.zeros_like(x) + 5.0)
    plan = timed_plan(A, wg, wu, wd, timer=FakeTimer(set()), device_name="test")
    assert all(c.path == "torch" and "differs" in c.why for c in plan)


def test_plans_must_cover_every_bucket():
    plan = default_plan(A)
    with pytest.raises(ValueError, match="one entry per token bucket"):
        generate_source([A], {A.key: plan[:-1]})


@pytest.mark.slow
def test_export_records_the_plans(tmp_path, device):
    from _pruning_fixtures import fresh, random_plan

    from prunegraph.plan.slicing import apply_plan
    from prunegraph.targets.triton.export import export_triton

    model = fresh("llama")
    apply_plan(model, random_plan("llama", 3))
    model.to(device)
    timer = FakeTimer(set())
    report = export_triton(model, tmp_path / "k", timer=timer)
    layers = json.loads((tmp_path / "k" / "layers.json").read_text())
    assert set(layers["plans"]) == set(report["paths"]) == {v["shape"] for v in
                                                            layers["layers"].values()}
    assert all(e["path"] == "triton" and e["source"].startswith("timed on")
               for p in layers["plans"].values() for e in p)
    assert len(timer.calls) == 2 * len(TOKEN_BUCKETS) * report["distinct_shapes"]
