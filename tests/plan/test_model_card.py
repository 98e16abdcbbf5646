"""What a run prints about loading the folder it saved (``loading_note``)."""

from __future__ import annotations

import json

import pytest

from prunegraph.plan.masks import MASKS_FILE
from prunegraph.plan.model_card import loading_note


@pytest.mark.parametrize("section,masks,says", [
    ({"uniform": True}, False, "a standard checkpoint (same widths in every layer)"),
    ({"uniform": False}, False, "plain transformers cannot load it"),
    (None, True, f"zeroed in place (masks in {MASKS_FILE}); AutoModelForCausalLM.from_pretrained"),
    (None, False, "a standard checkpoint; AutoModelForCausalLM.from_pretrained loads it"),
])
def test_the_note_matches_what_the_folder_holds(tmp_path, section, masks, says):
    """A sliced folder (prunegraph section) and a weight-pruned one (SaveSparse: plain
    save_pretrained, masks beside it) are told apart: the second loads with transformers."""
    config = {"model_type": "llama"} | ({"prunegraph": section} if section else {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    if masks:
        (tmp_path / MASKS_FILE).write_bytes(b"")
    assert says in loading_note(tmp_path)
