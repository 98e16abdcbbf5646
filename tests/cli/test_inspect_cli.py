"""`prunegraph inspect`: the table, and JSON/DOT/HTML files a person or a script can read."""

from __future__ import annotations

import json

import pytest

from prunegraph.cli.main import main


@pytest.mark.slow
def test_inspect_writes_json_dot_and_html(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["inspect", "random:qwen2-moe", "--json", str(out), "--dot", str(tmp_path / "g.dot"),
                 "--html", str(tmp_path / "g.html")]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp:experts" in table and "parameters =" in table
    data = json.loads(out.read_text())
    assert data["total_params"] == data["prunable_params"] + data["fixed_params"]
    kinds = {g["kind"] for g in data["groups"]}
    assert {"heads", "experts", "expert_channels", "shared_expert_channels", "hidden"} <= kinds
    for g in data["groups"]:
        assert {"name", "kind", "size", "params_per_unit", "members", "constraints"} <= set(g)
        if g["kind"] == "heads":
            assert g["constraints"]["kv_heads"] * g["constraints"]["q_per_kv"] == g["size"]
            assert g["constraints"]["head_dim"] > 0
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph")
    assert '"model.layers.0.mlp:experts" -> "model.layers.0.mlp.gate.weight"' in dot
    html = (tmp_path / "g.html").read_text()
    assert "<script>" in html and "model.layers.1.mlp.experts:expert_channels" in html
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_inspect_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "random:lama"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'random:lama'" in err and "llama" in err


def test_truncated_table_names_all_and_html_bars_scale_to_prunable_groups():
    from prunegraph.data.models import load_model
    from prunegraph.ir.analysis import analyze, report

    analysis = analyze(load_model("random:llama", tokenizer=False)[0])
    hidden = len(analysis.groups) - 2
    assert f"... {hidden} more groups (--all prints every group" in report.table(analysis, 2)
    assert "more groups" not in report.table(analysis)
    html = report.to_html(analysis)
    assert "DATA.groups.filter(g => !g.constraints.pinned)" in html  # the scale
