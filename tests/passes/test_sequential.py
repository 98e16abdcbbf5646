"""One-shot scores layer by layer from safetensors shards: the in-memory scores exactly, for
every criterion and architecture family, one layer in memory at a time; the same plan from a
model loaded on meta."""

from __future__ import annotations

import pytest
import torch
from _gate_fixtures import write_corpus
from _pruning_fixtures import fresh, groups_of
from _tiny_tokenizer import make_tokenizer

from prunegraph.errors import PreconditionError
from prunegraph.passes import _sequential
from prunegraph.passes._sequential import WeightSource, score_sequential
from prunegraph.passes.importance import score_groups


def _blocks(n: int = 5, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 200, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture saved as a Hugging Face folder (small shards: several files)."""
    root = tmp_path_factory.mktemp("seq")
    out = {}
    for arch in ("llama", "qwen3-moe", "gpt2", "mixtral"):
        fresh(arch).save_pretrained(root / arch, max_shard_size="40KB")
        out[arch] = root / arch
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "gpt2", "mixtral"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_sequential_scores_are_the_in_memory_scores(saved, arch, criterion):
    groups = list(groups_of(arch))
    blocks = _blocks()
    want = score_groups(fresh(arch), groups, criterion, blocks=blocks, batch_size=2,
                        progress=False)
    got = score_sequential(fresh(arch).to("meta"), groups, criterion, blocks, saved[arch],
                           batch_size=2, progress=False,
                           offload="disk" if criterion == "taylor" else "cpu")
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert got.stats.get("wanda_fallback") == want.stats.get("wanda_fallback")
    assert (got.stats["tokens"], got.stats["forwards"]) == (want.stats["tokens"],
                                                            want.stats["forwards"])


def test_one_decoder_layer_in_memory_at_a_time(saved, monkeypatch):
    seen = []
    run_layer = _sequential._Skeleton.run_layer

    def counting(self, index, hidden, args, kwargs):
        live = {n for n, p in self.model.named_parameters() if p.device.type != "meta"}
        seen.append((index, live))
        return run_layer(self, index, hidden, args, kwargs)

    monkeypatch.setattr(_sequential._Skeleton, "run_layer", counting)
    score_sequential(fresh("llama").to("meta"), list(groups_of("llama")), "wanda", _blocks(),
                     saved["llama"], batch_size=2, progress=False)
    assert {i for i, _ in seen} == {0, 1}
    for index, live in seen:
        assert live and all(n.startswith(f"model.layers.{index}.") for n in live)


@pytest.mark.slow
def test_plan_from_a_meta_model_equals_the_in_memory_plan(saved, tmp_path):
    from prunegraph.passes import Analyze, Prune
    from prunegraph.pipeline import Load, Pipeline

    folder = saved["llama"]
    make_tokenizer().save_pretrained(folder)
    corpus = write_corpus(tmp_path / "corpus.txt")
    prune = dict(criterion="wanda", sparsity=0.3, calib_blocks=4, block_len=16, source=corpus,
                 batch_size=2)
    dense = Pipeline([Load(str(folder), device="cpu"), Analyze(), Prune(**prune)]).run(
        progress=False)
    meta = Pipeline([Load(str(folder), device="meta"), Analyze(),
                     Prune(**prune, sequential=True)]).run(progress=False)
    assert next(meta.model.parameters()).device.type == "meta"
    for a, b in zip(dense.plan.groups, meta.plan.groups):
        assert a.group.name == b.group.name and torch.equal(a.keep, b.keep)
    assert dense.metrics["prune"]["removed"] == meta.metrics["prune"]["removed"]


def test_bad_weights_folder_is_refused(tmp_path):
    with pytest.raises(PreconditionError, match="no safetensors"):
        WeightSource(tmp_path)
    with pytest.raises(PreconditionError, match="offload"):
        _sequential.ActivationStore("gpu")
