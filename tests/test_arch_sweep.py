"""A fast, representative subset of the architecture sweep (``benchmarks/arch_sweep.py``).

Each type goes through every stage a user meets: a tiny config derived from its config class,
capture, analysis, a random plan whose sliced model must equal the gated one, save and reload.
The subset covers the families the sweep found hard: a hybrid with short convolutions (depthwise causal
conv), an encoder-decoder used as a causal LM (cross-attention parameters unused by the trace),
stacked rotary halves, an MoE routed through gather and scatter, and a block shared by several
layers (one tensor under several names: gated, sliced and saved under each). A type missing from the
installed transformers is skipped, not failed: new releases add and rename types.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from arch_sweep import STAGES, check, markdown, summarise  # noqa: E402

from prunegraph.data.tiny_configs import causal_lm_types, tiny_config  # noqa: E402

SUBSET = ["lfm2", "bart", "codegen", "afmoe", "zamba"]


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_passes_every_stage(model_type):
    if model_type not in causal_lm_types():
        pytest.skip(f"{model_type} is not a causal-LM type of this transformers")
    result = check(model_type)
    assert all(result[s] for s in STAGES), (result.get("stage_failed"), result.get("error"))
    assert result["prunable_groups"] > 0 and result["params_removed"] > 0
    assert not result["fallback_ops"], result["fallback_ops"]


def test_tiny_configs_derive_for_almost_every_type():
    """The derivation is generic: it must not need a table entry per type."""
    types = causal_lm_types()
    tiny, failed = 0, []
    for t in types:
        try:
            cfg = tiny_config(t)
        except Exception as e:  # a default config this transformers cannot build
            failed.append(f"{t}: {type(e).__name__}")
            continue
        try:
            text = cfg.get_text_config()
        except ValueError:  # several text configs (an encoder's and a decoder's)
            text = cfg
        layers = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                       if isinstance(getattr(text, k, None), int)), None)
        tiny += getattr(text, "hidden_size", 64) == 64 and (layers is None or layers <= 4)
    assert tiny >= 0.9 * len(types), failed


def test_sweep_table_names_every_failing_type_with_its_reason():
    ok = {"type": "a", **{s: True for s in STAGES}, "prunable_groups": 2}
    bad = {"type": "b", **{s: s == "built" for s in STAGES}, "stage_failed": "capture",
           "error": "CaptureError: data-dependent loop | over experts"}
    unbuilt = {"type": "c", **{s: False for s in STAGES}, "stage_failed": "built",
               "error": "ImportError: needs timm"}
    s = summarise([ok, bad, unbuilt])
    assert (s["types"], s["built"], s["reload"], s["pass_rate_of_built"]) == (3, 2, 1, 0.5)
    text = markdown([ok, bad, unbuilt], {"transformers": "x", "torch": "y", "machine": "m",
                                         "minutes": 1.0, "command": "python benchmarks/arch_sweep.py"})
    assert "| 3 | 2 | 1 | 1 | 1 | 1 |" in text
    assert "| b | capture | CaptureError: data-dependent loop \\| over experts |" in text
    assert "| c | built | ImportError: needs timm |" in text
