"""LEAP: the anneal, the soft mask and its gradients, the Wanda initialisation, the penalty, the
exact top-k, resume, checkpointing, the polish, and the pipeline to a plain HF checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _gate_fixtures import corpus, one_thread  # noqa: F401
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer

from prunegraph.errors import SpecError
from prunegraph.passes import Finalize, Gate, SaveSparse, Train
from prunegraph.passes.gates.leap import LeapGates, MaskSpec, _LeapLinear, leap_schedule, nm_shift, soft_mask
from prunegraph.passes.train.loop import TrainingHalted
from prunegraph.pipeline.contract import State


def leap_state(corpus, arch="llama", sparsity=0.6, scope="global", **options) -> State:
    state = State(model=fresh(arch), tokenizer=make_tokenizer(), groups=list(groups_of(arch)))
    opts = {"source": corpus, "calib_blocks": 4, "block_len": 32, **options}
    return Gate(family="leap", sparsity=sparsity, scope=scope, lr=0.05, options=opts)(state).state


def train(state, run_dir, **kw):
    state.run_dir = run_dir
    return Train(**{"batch_size": 2, "block_len": 32, "warmup": 2, "kd_weight": 0.0,
                    "source": kw.pop("source"), **kw})(state)


# -- maths ---------------------------------------------------------------------------------


def test_anneal_is_linear_from_25_to_350_and_4_to_0_05():
    assert leap_schedule(0, 100) == (25.0, 4.0)
    assert leap_schedule(100, 100) == (350.0, 0.05)
    a, t = leap_schedule(25, 100)
    assert a == pytest.approx(25 + 325 / 4) and t == pytest.approx(4 - 3.95 / 4)
    assert leap_schedule(500, 100) == (350.0, 0.05)


def test_soft_mask_hand_case_and_noise():
    P = torch.tensor([[0.04, -0.04, 0.0]])
    M = soft_mask(P, MaskSpec(25.0, 4.0, None), 1)
    expect = torch.sigmoid(torch.tensor([0.25, -0.25, 0.0]))            # 0.562, 0.438, 0.5
    torch.testing.assert_close(M[0], expect)
    big = torch.zeros(200_000, 1)
    a = soft_mask(big, MaskSpec(1.0, 1.0, 7), 1)
    b = soft_mask(big, MaskSpec(1.0, 1.0, 7), 1)
    assert torch.equal(a, b)                                           # the seed fixes the noise
    g = torch.logit(a.double())                                        # = the logistic sample
    assert abs(float(g.mean())) < 0.02
    assert float(g.std()) == pytest.approx(math.pi / math.sqrt(3), rel=0.02)
    assert not torch.equal(a, soft_mask(big, MaskSpec(1.0, 1.0, 8), 1))


def test_nm_shift_centres_each_group_between_its_second_and_third_logit():
    P = torch.tensor([[0.4, 0.1, -0.2, 0.3, 1., 2., 3., 4.]])
    shift = nm_shift(P, 2, 4, 1)
    torch.testing.assert_close(shift, torch.tensor([[0.2] * 4 + [2.5] * 4]))
    M = soft_mask(P, MaskSpec(100.0, 0.05, None, nm=(2, 4)), 1)
    assert (M > 0.5).tolist() == [[True, False, False, True, False, False, True, True]]


@pytest.mark.parametrize("in_dim", [1, 0])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_fused_linear_gradients_match_plain_autograd(in_dim, nm):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 12, generator=gen) if in_dim == 1 else torch.randn(12, 8, generator=gen)
    b = torch.randn(8, generator=gen)
    P = (torch.randn(W.shape, generator=gen) * 0.05).requires_grad_()
    x = torch.randn(2, 3, 12, generator=gen, requires_grad=True)
    spec = MaskSpec(40.0, 1.5, 123, nm, 0.01 if nm is None else 0.0)
    r = torch.randn(2, 3, 8, generator=gen)

    y, m_sum, sq = _LeapLinear.apply(x, W, b, P, spec, in_dim)
    ((y * r).sum() + 0.3 * m_sum - 0.7 * torch.sqrt(sq)).backward()
    got_P, got_x = P.grad.clone(), x.grad.clone()

    P.grad = x.grad = None
    noise = torch.logit(soft_mask(torch.zeros_like(P), MaskSpec(1.0, 1.0, 123), in_dim).double()
                        ).float()
    shift = nm_shift(P, *nm, in_dim) if nm else spec.shift
    M = torch.sigmoid((spec.alpha * (P - shift) + noise) / spec.tau)
    Weff = W * M
    ref = F.linear(x, Weff if in_dim == 1 else Weff.t(), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ((ref * r).sum() + 0.3 * M.sum() - 0.7 * torch.sqrt((Weff ** 2).sum())).backward()
    torch.testing.assert_close(got_P, P.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-5)


# -- the family ----------------------------------------------------------------------------


def test_wanda_initialisation_puts_the_prior_on_the_wanda_mask(corpus):
    from prunegraph.data.blocks import text_blocks
    from prunegraph.passes.sparse_prune import oneshot_masks

    state = leap_state(corpus, sparsity=0.6)
    fam = state.gate_family
    assert all(torch.equal(p, q) for p, q in zip(state.model.parameters(),
                                                 fresh("llama").parameters()))  # untouched
    blocks = text_blocks(make_tokenizer(), corpus, "calibration", 32, 4)
    wanda, _ = oneshot_masks(fresh("llama"), "wanda", 0.6, blocks=blocks)
    gen = torch.Generator().manual_seed(0)
    for name in fam.linears:
        P = fam.logit(name).detach().float()
        assert P.dtype == torch.float32 and fam.logit(name).dtype == torch.bfloat16
        noise = torch.randn(P.shape, generator=gen) * 0.014
        prior = (P - noise)                                  # +-3 std, up to bf16 rounding
        assert torch.equal(prior > 0, wanda.masks[name]), name
        assert float(prior.abs().mean()) == pytest.approx(3 * 0.014, rel=0.1)


def test_penalty_is_the_density_gap_and_the_decayed_magnitude_ratio(corpus):
    state = leap_state(corpus, sparsity=0.5)
    fam = state.gate_family
    names = list(fam.linears)[:2]
    records = [(n, torch.tensor(0.3 * fam.numel[n]), torch.tensor(4.0)) for n in names]
    loss, stats = fam.penalty_terms(records, 25, 100)
    density = 0.3
    ratio = 2 * 2.0 / sum(fam.weight_norm[n] for n in names)
    assert stats["expected_sparsity"] == pytest.approx(1 - density)
    assert float(loss) == pytest.approx(7 * abs(density - 0.5) - 10 * 0.75 * ratio, rel=1e-5)
    assert float(fam.penalty_terms(records, 100, 100)[0]) == pytest.approx(7 * 0.2, rel=1e-5)


def test_teacher_is_the_dense_model_and_hard_masks_of_all_ones_too(corpus):
    state = leap_state(corpus)
    x = torch.randint(4, 100, (2, 16))
    dense = fresh("llama").eval()(x).logits
    with torch.no_grad():
        state.gates.enabled = False
        torch.testing.assert_close(state.model(x).logits, dense)
        state.gates.enabled = True
        for p in state.gate_family.logits.values():
            p.fill_(1.0)
        state.gates.set(MaskSpec(350.0, 0.05, 0), 0)
        state.gate_family.eval()                       # no noise: M = sigmoid(7000) = 1
        torch.testing.assert_close(state.model(x).logits, dense)


@pytest.mark.parametrize("scope", ["global", "group"])
def test_exact_topk_meets_the_budget_and_threshold_is_the_sign(corpus, scope):
    state = leap_state(corpus, sparsity=0.6, scope=scope, logits_dtype="float32")  # no ties
    fam = state.gate_family
    with torch.no_grad():
        for p in fam.logits.values():
            p.copy_(torch.randn(p.shape) * 0.03)
    masks = fam.final_masks("topk")
    k = sum(n - round(0.6 * n) for n in fam.numel.values())
    assert masks.kept() == k
    if scope == "group":
        for layer in (0, 1):
            names = [n for n in fam.linears if f".{layer}." in n]
            kept = sum(int(masks.masks[n].sum()) for n in names)
            assert kept == sum(fam.numel[n] - round(0.6 * fam.numel[n]) for n in names)
    flat = torch.cat([fam.logit(n).float().reshape(-1) for n in fam.linears])
    kept = torch.cat([masks.masks[n].reshape(-1) for n in fam.linears])
    if scope == "global":
        assert flat[kept].min() >= flat[~kept].max()
    shift = fam.exact_shift()
    for n in fam.linears:   # the polish's shift keeps the same weights
        assert torch.equal(fam.logit(n).float() > shift[n], masks.masks[n])
    thr = fam.final_masks("threshold")
    assert all(torch.equal(thr.masks[n], fam.logit(n) > 0) for n in fam.linears)


def test_block_targets(corpus):
    state = leap_state(corpus, sparsity=0.5, scope="group", block_targets={"1": 0.7})
    fam = state.gate_family
    masks = fam.final_masks()
    per_layer = masks.per_layer()
    assert per_layer[0] == pytest.approx(0.5, abs=1e-3) and per_layer[1] == pytest.approx(0.7,
                                                                                          abs=1e-3)
    with pytest.raises(SpecError, match="layer index"):
        leap_state(corpus, sparsity=0.5, scope="group", block_targets={"7": 0.7})


def test_bad_options_fail_at_construction():
    with pytest.raises(SpecError, match="removes 0.5"):
        Gate(family="leap", sparsity=0.6, options={"pattern": "2:4"})
    with pytest.raises(SpecError, match="no option"):
        Gate(family="leap", sparsity=0.5, options={"mu0": 0.5})
    with pytest.raises(SpecError, match="N:M"):
        Gate(family="leap", sparsity=0.5, options={"pattern": 124})   # an unquoted YAML 2:4
    with pytest.raises(SpecError, match="logits_dtype"):
        Gate(family="leap", sparsity=0.5, options={"logits_dtype": "int8"})
    with pytest.raises(SpecError, match="budget"):
        Gate(family="leap", sparsity=0.5, budget="units")
    with pytest.raises(SpecError, match="alpha"):
        Gate(family="leap", sparsity=0.5, options={"alpha": [25, 0]})


# -- training ------------------------------------------------------------------------------


def test_training_moves_logits_leaves_weights_and_logs(tmp_path, corpus):
    state = leap_state(corpus, sparsity=0.6)
    before = {n: p.detach().clone() for n, p in state.gate_family.logits.items()}
    weights = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    result = train(state, tmp_path, steps=8, source=corpus, checkpoint_every=4)
    assert all(torch.equal(p, weights[n]) for n, p in state.model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in state.gate_family.logits.items())
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert {"loss", "ce", "expected_sparsity", "threshold_sparsity", "weight_ratio", "alpha",
            "tau", "lr"} <= set(lines[0])
    assert lines[0]["alpha"] == 25.0 and lines[-1]["alpha"] == pytest.approx(25 + 325 * 7 / 8)
    for plot in ("loss.png", "sparsity.png", "schedule.png"):
        assert (tmp_path / "train" / plot).stat().st_size > 1000
    assert result.stats["target_sparsity"] == pytest.approx(0.6)


@pytest.mark.parametrize("polish", [0, 3])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, corpus, polish):
    kw = dict(steps=6, polish_steps=polish, checkpoint_every=2, source=corpus, plots=False,
              kd_weight=1.0)
    full = leap_state(corpus)
    train(full, tmp_path / "a", **kw)
    with pytest.raises(TrainingHalted):
        train(leap_state(corpus), tmp_path / "b", halt_after=4, **kw)
    again = leap_state(corpus)
    assert train(again, tmp_path / "b", **kw).stats["resumed_at"] == 4
    for n, v in full.trained_gates.items():
        assert torch.equal(again.trained_gates[n], v)
    assert ((tmp_path / "a" / "train" / "metrics.jsonl").read_text()
            == (tmp_path / "b" / "train" / "metrics.jsonl").read_text())


def test_activation_checkpointing_trains_the_same_logits(tmp_path, corpus):
    kw = dict(steps=3, source=corpus, plots=False, checkpoint_every=10)
    plain = leap_state(corpus)
    train(plain, tmp_path / "a", **kw)
    ckpt = leap_state(corpus, checkpointing=True)
    train(ckpt, tmp_path / "b", **kw)
    for n, v in plain.trained_gates.items():
        torch.testing.assert_close(ckpt.trained_gates[n].float(), v.float(), rtol=0, atol=1e-2)
    a = [json.loads(x)["loss"] for x in (tmp_path / "a/train/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "b/train/metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)


def test_polish_trains_at_the_exact_budget_and_finalize_keeps_it(tmp_path, corpus):
    state = leap_state(corpus, sparsity=0.6, logits_dtype="float32")   # no bf16 ties at the cut
    result = train(state, tmp_path, steps=6, polish_steps=3, source=corpus, plots=False)
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["polish"] for x in lines] == [False] * 3 + [True] * 3
    assert all(x["penalty"] == 0.0 and x["alpha"] == 350.0 for x in lines[3:])
    assert result.stats["threshold_sparsity"] is not None
    fam = state.gate_family
    shift = fam.exact_shift()
    masks = Finalize()(state).state.masks
    assert all(torch.equal(fam.logit(n).float() > shift[n], masks.masks[n]) for n in fam.linears)


@pytest.mark.parametrize("arch,pattern", [("qwen3", "unstructured"), ("gpt2", "2:4")])
def test_pipeline_to_a_plain_hf_checkpoint(tmp_path, corpus, arch, pattern):
    from transformers import AutoModelForCausalLM

    from prunegraph.plan.masks import MASKS_FILE, MaskSet

    state = leap_state(corpus, arch=arch, sparsity=0.5, pattern=pattern)
    train(state, tmp_path, steps=4, polish_steps=1, source=corpus, kd_weight=1.0)
    result = Finalize()(state)
    assert result.stats["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    masks = result.state.masks
    masks.check_pattern()
    assert not any("forward" in vars(m) for m in state.model.modules())   # plain modules again
    assert (tmp_path / "sparsity" / "per_layer.md").is_file()
    SaveSparse()(result.state)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    x = torch.randint(4, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, state.model.eval()(x).logits)
    saved = MaskSet.load(tmp_path / "model" / MASKS_FILE)
    assert saved.method == "leap" and saved.pattern == pattern
    assert isinstance(state.gate_family, LeapGates)


def test_pipeline_validates_and_runs_with_the_invariant_checks(tmp_path, corpus):
    """Built as one pipeline: SaveSparse's need for masks is met by Finalize's may_provide, the
    gates-at-one check runs around Gate (LEAP's masks all at 1 = the model before), and every
    provided key has its declared type."""
    from prunegraph.pipeline import Pipeline

    opts = {"source": corpus, "calib_blocks": 4, "block_len": 32}
    pipe = Pipeline([Gate(family="leap", sparsity=0.5, lr=0.05, options=opts),
                     Train(steps=3, batch_size=2, block_len=32, warmup=1, kd_weight=1.0,
                           source=corpus, plots=False),
                     Finalize(), SaveSparse()], initial=("model", "tokenizer", "groups"))
    state = pipe.run(State(model=fresh("llama"), tokenizer=make_tokenizer(),
                           groups=list(groups_of("llama"))), run_dir=tmp_path / "run",
                     checks=True, progress=False)
    assert state.masks.sparsity() == pytest.approx(0.5, abs=1e-4)
    assert (tmp_path / "run" / "model" / "masks.safetensors").is_file()
    with pytest.raises(SpecError, match="masks"):
        Pipeline([SaveSparse()], initial=("model", "tokenizer"))
