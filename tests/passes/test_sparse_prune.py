"""One-shot weight pruning end to end: the layer walk, the pass, saving, reloading, ONNX."""

from __future__ import annotations

import pytest
import torch
from _gate_fixtures import corpus  # noqa: F401  (fixture)
from _pruning_fixtures import ARCHS, fresh
from _tiny_tokenizer import make_tokenizer

from prunegraph.errors import PreconditionError, SpecError
from prunegraph.passes._calibration import input_norms
from prunegraph.passes._layerwise import decoder_layers, for_each_layer
from prunegraph.passes.sparse_prune import SparsePrune, oneshot_masks, prunable_weights
from prunegraph.pipeline.contract import State
from prunegraph.plan.masks import MASKS_FILE, MaskSet


def _blocks(seed=0, n=6, length=16):
    return torch.randint(4, 250, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_walk_feeds_each_layer_what_the_model_does(arch):
    """Without pruning, layer i sees exactly the hidden states of a plain forward (per-layer
    masks and position embeddings included: Gemma 3 mixes sliding and full attention)."""
    model = fresh(arch).eval()
    _, layers = decoder_layers(model)
    blocks = _blocks()
    seen = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.setdefault(i, []).append(
            (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in blocks.split(4):
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    walked = {}

    def visit(i, layer, run):
        h = layer.register_forward_pre_hook(
            lambda m, a, kw: walked.setdefault(i, []).append(
                (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
        run()
        h.remove()

    assert for_each_layer(model, blocks, 4, visit) == 2
    assert sorted(walked) == list(range(len(layers)))
    for i in walked:
        for a, b in zip(seen[i], walked[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-moe"])
def test_dense_order_wanda_matches_the_input_norms_helper(arch):
    """sequential=False: Wanda's norms are the dense model's, as the project's helper collects."""
    model = fresh(arch)
    names = prunable_weights(model)
    blocks = _blocks(1)
    norms, _, _ = input_norms(model, {n: m.weight for n, (m, _) in names.items()}, blocks, 4,
                              False)
    ref = fresh(arch)
    masks, _ = oneshot_masks(model, "wanda", 0.5, blocks=blocks, batch_size=4, sequential=False)
    from prunegraph.passes.sparse_masks import keep_unstructured, wanda_scores

    for n, (mod, dim) in prunable_weights(ref).items():
        want = keep_unstructured(wanda_scores(mod.weight, norms[n].reshape(-1), dim), 0.5, dim)
        assert torch.equal(masks.masks[n], want), n


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pass_prunes_in_place_and_reports(tmp_path, corpus, method, pattern):
    model = fresh("llama")
    state = State(model=model, tokenizer=make_tokenizer(), run_dir=tmp_path)
    sparsity = 0.6 if pattern == "unstructured" else None
    result = SparsePrune(method=method, sparsity=sparsity, pattern=pattern, source=corpus,
                         calib_blocks=4, block_len=32, batch_size=2, blocksize=32)(state)
    masks = result.state.masks
    target = 0.6 if pattern == "unstructured" else 0.5
    assert result.stats["achieved_sparsity"] == pytest.approx(target, abs=0.02)
    assert result.stats["forwards"] == (0 if method == "magnitude" else 2)
    masks.check_pattern()
    params = dict(model.named_parameters())
    for n, keep in masks.masks.items():
        assert bool((params[n][~keep] == 0).all())
    assert sorted(p.name for p in (tmp_path / "sparsity").iterdir()) == [
        "per_layer.md", "per_layer.png", "weights.csv"]
    table = (tmp_path / "sparsity" / "per_layer.md").read_text()
    assert "q_proj" in table and "down_proj" in table
    with torch.no_grad():
        assert bool(torch.isfinite(model(_blocks()).logits).all())


def test_sparsegpt_beats_wanda_on_layer_reconstruction(corpus):
    """Same calibration, same sparsity: SparseGPT's updated weights reconstruct the dense
    layer outputs better than Wanda's masked ones."""
    blocks = _blocks(2, n=8, length=32)
    dense = fresh("llama").eval()
    errs = {}
    for method in ("wanda", "sparsegpt"):
        model = fresh("llama")
        oneshot_masks(model, method, 0.6, blocks=blocks, batch_size=4)
        with torch.no_grad():
            errs[method] = float((model.model(blocks).last_hidden_state
                                  - dense.model(blocks).last_hidden_state).pow(2).mean())
    assert errs["sparsegpt"] < errs["wanda"]


def test_bad_settings_fail_at_construction():
    with pytest.raises(SpecError, match="needs a sparsity"):
        SparsePrune(method="wanda")
    with pytest.raises(SpecError, match="removes 0.5"):
        SparsePrune(pattern="2:4", sparsity=0.6)
    with pytest.raises(SpecError, match="N:M"):
        SparsePrune(pattern="2of4")
    with pytest.raises(SpecError, match="regex"):
        SparsePrune(sparsity=0.5, skip=("(",))
    with pytest.raises(SpecError, match="parameter"):
        SparsePrune(sparsity=0.5, method="obs")
    with pytest.raises(SpecError, match="multiple of 3"):
        oneshot_masks(fresh("llama"), "magnitude", 0.5, "2:3")


@pytest.mark.slow
def test_save_reload_with_plain_transformers_and_export_onnx(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    from prunegraph.passes.save_sparse import SaveSparse

    model = fresh("qwen3")
    tok = make_tokenizer()
    state = State(model=model, tokenizer=tok, run_dir=tmp_path)
    state = SparsePrune(method="wanda", pattern="2:4", source=corpus, calib_blocks=4,
                        block_len=32)(state).state
    state = SaveSparse(path="model")(state).state
    folder = tmp_path / "model"
    assert (folder / MASKS_FILE).is_file() and (folder / "sparsity" / "per_layer.png").is_file()
    back = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = _blocks(3, n=2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits)
    masks = MaskSet.load(folder / MASKS_FILE)
    assert masks.pattern == "2:4" and masks.method == "wanda"
    assert all(torch.equal(masks.masks[n], state.masks.masks[n]) for n in masks.masks)
    assert MaskSet.from_model(back).sparsity() == pytest.approx(masks.sparsity())

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from prunegraph.targets.onnx import export_onnx

    report = export_onnx(back, tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= report["tolerance"]


def test_save_refuses_masks_that_were_not_applied(tmp_path):
    from prunegraph.passes.save_sparse import save_sparse

    model = fresh("llama")
    masks, _ = oneshot_masks(model, "magnitude", 0.5)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(PreconditionError, match="apply the masks"):
        save_sparse(model, masks, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_model_loaded_from_gguf_saves_as_plain_weights(tmp_path):
    """transformers keeps the GGUF quantizer on a model it dequantised and refuses
    save_pretrained; SaveSparse writes the plain weights, a config without the GGUF
    quantization_config, and leaves the model as it was."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from prunegraph.passes.save_sparse import save_sparse

    model = fresh("llama").eval()
    masks, _ = oneshot_masks(model, "magnitude", 0.5)
    quantizer = GgufHfQuantizer(GgufConfig())
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(str(tmp_path / "direct"))
    save_sparse(model, masks, tmp_path / "m")
    assert model.hf_quantizer is quantizer
    assert model.config.quantization_config is quantizer.quantization_config
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert getattr(back, "hf_quantizer", None) is None
    assert "quantization_config" not in (tmp_path / "m" / "config.json").read_text()
    ids = _blocks(4, n=2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)
