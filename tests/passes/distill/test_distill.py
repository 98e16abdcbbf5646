"""The Distill pass: loss maths by hand, LoRA merged == unmerged, exact resume, KL goes down,
save + reload after a LoRA merge, and the teacher's source checked before any training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _gate_fixtures import corpus, one_thread  # noqa: F401
from _paths import ROOT
from _pruning_fixtures import groups_of
from _tiny_tokenizer import make_tokenizer

from prunegraph import from_pretrained
from prunegraph.data.blocks import text_blocks
from prunegraph.data.models import load_model
from prunegraph.errors import SpecError
from prunegraph.passes import Distill, Prune, Slice
from prunegraph.passes.distill.lora import add_lora, lora_parameters, merge_lora
from prunegraph.passes.distill.losses import hidden_loss, matching_layers
from prunegraph.passes.train import TrainingHalted, kd_loss
from prunegraph.pipeline import Load
from prunegraph.pipeline.contract import State
from prunegraph.targets.hf import Save


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """The tiny random Llama with its final norm scaled 5x, so its next-token distributions
    are peaked and a pruned copy is measurably far from it; saved as a HF folder."""
    model, _ = load_model("random:llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    path = tmp_path_factory.mktemp("dense") / "model"
    model.save_pretrained(path)
    return path


def sliced(dense_dir, sparsity: float = 0.4) -> State:
    state = Load(str(dense_dir))(State()).state
    state.tokenizer = make_tokenizer()
    state.groups = list(groups_of("llama"))
    state = Prune(criterion="magnitude", sparsity=sparsity)(state).state
    return Slice()(state).state


def distill(state: State, run_dir, **kw) -> State:
    train = {"steps": 6, "batch_size": 2, "block_len": 32, "warmup": 1, "plots": False,
             **kw.pop("train", {})}
    state.run_dir = run_dir
    return Distill(**{"train": train, **kw})(state).state


def batch_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]))


# -- loss maths -------------------------------------------------------------------------------

def test_kd_loss_matches_hand_computed_values():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert float(kd_loss(student, teacher)) == pytest.approx(0.1308120, abs=1e-6)
    # T = 2: p = (√3, 1) / (√3 + 1), q uniform; times T² = 4
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(4 * 0.0363408, abs=1e-6)
    # averaged over tokens: a second token where teacher == student adds 0
    two_s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    two_t = torch.tensor([[[math.log(3.0), 0.0], [1.0, 2.0]]])
    assert float(kd_loss(two_s, two_t)) == pytest.approx(0.1308120 / 2, abs=1e-6)


def test_hidden_loss_matches_hand_computed_values():
    emb = torch.zeros(1, 1, 2)
    student = (emb, torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0]]]))
    teacher = (emb, torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]]))
    layers = matching_layers(student, teacher)
    assert layers == [1]  # the embeddings are left out, the narrower layer 2 too
    # mean((s - t)²) = (0 + 4) / 2 = 2; mean(t²) = 1/2
    assert float(hidden_loss(student, teacher, layers)) == pytest.approx(4.0)


# -- LoRA ---------------------------------------------------------------------------------------

def test_lora_merged_equals_unmerged_and_keeps_names(dense_dir):
    state = sliced(dense_dir)
    model = state.model
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    wrapped = add_lora(model, rank=4, alpha=8.0, seed=0)
    adapters = lora_parameters(model)
    assert adapters and all(".lora_" in n for n in adapters)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B starts at 0
        gen = torch.Generator().manual_seed(2)
        for n, p in adapters.items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        unmerged = model(ids).logits
    assert not torch.allclose(unmerged, before, atol=1e-3)
    merged = merge_lora(wrapped)
    assert merged is model
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert {n: tuple(p.shape) for n, p in merged.named_parameters()} == names


# -- the pass -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "lora"])
def test_distill_lowers_kl_to_the_dense_model(tmp_path, corpus, dense_dir, mode):
    state = sliced(dense_dir)
    teacher, _ = load_model(str(dense_dir))
    ids = text_blocks(make_tokenizer(), corpus, "calibration", 32)[:8]
    before = batch_kl(state.model, teacher, ids)
    lr = 3e-4 if mode == "full" else 3e-3
    flags = {n: p.requires_grad for n, p in state.model.named_parameters()}
    state = distill(state, tmp_path, mode=mode, lr=lr, hidden_weight=0.5,
                    train={"steps": 12, "source": corpus, "plots": True})
    after = batch_kl(state.model, teacher, ids)
    assert before > 0.05 and after < 0.5 * before
    lines = [json.loads(x) for x in
             (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    # ce_weight 0: the loss is the KL plus the weighted hidden term, CE only logged
    for x in lines:
        assert x["loss"] == pytest.approx(x["kl"] + 0.5 * x["hidden"], rel=1e-5)
    assert (tmp_path / "distill" / "loss.png").stat().st_size > 1000
    assert not (tmp_path / "distill" / "checkpoint.pt").exists()  # deleted once done
    assert not any(".lora_" in n for n, _ in state.model.named_parameters())
    assert {n: p.requires_grad for n, p in state.model.named_parameters()} == flags
    record = state.metrics["distill"]
    assert record["tokens"] == 12 * 2 * 32 and record["kl_last"] < record["kl_first"]


def test_full_mode_leaves_embeddings_alone_unless_asked(tmp_path, corpus, dense_dir):
    state = sliced(dense_dir)
    emb = state.model.get_input_embeddings().weight.detach().clone()
    layer = state.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    state = distill(state, tmp_path, lr=1e-3, train={"steps": 2, "source": corpus})
    assert torch.equal(state.model.get_input_embeddings().weight, emb)
    assert not torch.equal(state.model.model.layers[0].mlp.down_proj.weight, layer)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.slow
def test_resume_after_interruption_is_bit_exact(tmp_path, corpus, dense_dir, mode):
    kw = dict(mode=mode, lr=1e-3, train={"steps": 6, "checkpoint_every": 2, "source": corpus,
                                         "keep_checkpoint": True})
    full = distill(sliced(dense_dir), tmp_path / "a", **kw)
    halted = dict(kw, train={**kw["train"], "halt_after": 3})
    with pytest.raises(TrainingHalted, match="resume"):
        distill(sliced(dense_dir), tmp_path / "b", **halted)
    again = distill(sliced(dense_dir), tmp_path / "b", **kw)   # a fresh process: new models
    assert again.metrics["distill"]["resumed_at"] == 3
    want = dict(full.model.named_parameters())
    for name, p in again.model.named_parameters():
        assert torch.equal(p, want[name]), name
    a = (tmp_path / "a" / "distill" / "metrics.jsonl").read_text()
    b = (tmp_path / "b" / "distill" / "metrics.jsonl").read_text()
    assert a == b


def test_save_and_reload_after_lora_merge(tmp_path, corpus, dense_dir):
    state = distill(sliced(dense_dir), tmp_path, mode="lora", lr=1e-2,
                    train={"steps": 3, "source": corpus})
    state = Save(path="model")(state).state
    reloaded = from_pretrained(tmp_path / "model")
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, state.model(ids).logits)


# -- bad input, refused before any training -----------------------------------------------------

def test_no_teacher_source_is_refused(dense_dir):
    state = sliced(dense_dir)
    del state.model_source
    with pytest.raises(SpecError, match="name the dense model with Distill.teacher"):
        Distill(train={"steps": 1})(state)


def test_a_pruned_folder_is_no_teacher(tmp_path, dense_dir):
    state = sliced(dense_dir)
    state.run_dir = tmp_path
    Save(path="pruned")(state)
    reloaded = Load(str(tmp_path / "pruned"))(State()).state
    with pytest.raises(SpecError, match="a pruned folder, which is not the dense model"):
        Distill(train={"steps": 1})(reloaded)


def test_a_teacher_of_another_architecture_is_refused(dense_dir):
    state = sliced(dense_dir)
    with pytest.raises(SpecError, match="not the dense model the plan was made from"):
        Distill(teacher="random:qwen3", train={"steps": 1})(state)


@pytest.mark.parametrize("kw", [dict(kd_weight=0.0, ce_weight=0.0), dict(temperature=0.0),
                                dict(lr=-1.0), dict(kd_weight=0.0, ce_weight=1.0,
                                                    hidden_weight=1.0),
                                dict(lora_rank=0, mode="lora"), dict(lora_targets=("q_proj",)),
                                dict(train={"steps": 0}), dict(train={"stepz": 3})])
def test_bad_parameters_fail_at_construction(kw):
    with pytest.raises(SpecError):
        Distill(**kw)


def test_spec_form_nests_the_training_settings():
    d = Distill(mode="lora", train={"steps": 7})
    params = d.params()
    assert params["train"]["steps"] == 7 and params["train"]["warmup"] == 10
    assert Distill.from_params(params) == d


def test_the_shipped_distill_example_resolves():
    from prunegraph.pipeline.spec import load_spec

    spec = load_spec(ROOT / "examples" / "distill-smollm2.yaml")
    names = [p.pass_name() for p in spec.pipeline.passes]
    assert names.index("Slice") < names.index("Distill") < names.index("Save")
    distill_pass = spec.pipeline.passes[names.index("Distill")]
    assert distill_pass.train.steps > 0 and distill_pass.mode == "full"
