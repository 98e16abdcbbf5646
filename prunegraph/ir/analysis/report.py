"""Views of an analysis a person can read: a table, JSON, a networkx graph, DOT and HTML.

The networkx graph is the data behind the pictures: one node per group and per parameter, an
edge ``group -> parameter`` per member (with its dim, role and index map). DOT and HTML are
rendered from it, so what is drawn is exactly what the passes use.
"""

from __future__ import annotations

import html
import json
from collections import Counter

import networkx as nx

from prunegraph.ir.groups import Group

__all__ = ["table", "to_json", "to_networkx", "to_dot", "to_html", "summary", "fallback_text"]


def _constraint_text(g: Group) -> str:
    c = g.constraints
    parts = []
    if c.pinned:
        parts.append(f"pinned: {c.pinned_reason}")
    if c.kv_heads is not None:
        parts.append(f"kv_heads={c.kv_heads} q_per_kv={c.q_per_kv} head_dim={c.head_dim} (pinned)")
    if c.experts is not None:
        parts.append(f"per expert x{c.experts}")
    if c.removal == "mask_logit":
        parts.append(f"routed, min {c.min_units} (top-k)")
    return "; ".join(parts)


def summary(analysis) -> dict:
    kinds = Counter(g.kind for g in analysis.groups)
    prop = analysis.propagation
    return {
        "model_class": analysis.model_class,
        "total_params": analysis.total_params,
        "prunable_params": analysis.prunable_params(),
        "fixed_params": analysis.total_params - analysis.prunable_params(),
        "prunable_share": round(analysis.prunable_params() / max(1, analysis.total_params), 4),
        "groups": dict(kinds),
        "seconds": analysis.seconds,
        "capture_attempt": analysis.graph.meta.get("attempt"),
        "fallback": {op: len(nodes) for op, nodes in (prop.fallback.items() if prop else ())},
        "notes": list(getattr(analysis, "notes", [])),
    }


def fallback_text(analysis, max_params: int = 4) -> list[str]:
    """Lines saying which ops without a rule pinned which parameters (empty when none)."""
    prop = analysis.propagation
    if prop is None or not prop.fallback:
        return []
    pins = analysis.fallback_pins()
    lines = ["ops with no dimension rule (their spaces are pinned; register a rule to prune them):"]
    for op, nodes in sorted(prop.fallback.items()):
        params = pins.get(op, [])
        shown = ", ".join(params[:max_params]) + (f" and {len(params) - max_params} more"
                                                  if len(params) > max_params else "")
        lines.append(f"  {op} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}): "
                     f"pins {shown or 'no parameter space'}")
    return lines


def table(analysis, max_rows: int | None = None) -> str:
    """A fixed-width table of groups plus the parameter totals."""
    rows = [("group", "kind", "size", "params/unit", "constraints")]
    groups = analysis.groups if max_rows is None else analysis.groups[:max_rows]
    for g in groups:
        rows.append((g.name, g.kind, str(g.size), f"{g.params_per_unit:,.0f}", _constraint_text(g)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) if j != 2 else r[j].rjust(widths[j])
                               for j in range(4)) + "  " + r[4])
        if i == 0:
            lines.append("-" * (sum(widths) + 8 + 11))
    if max_rows is not None and len(analysis.groups) > max_rows:
        lines.append(f"... {len(analysis.groups) - max_rows} more groups (--all prints every "
                     f"group; --json FILE writes them with their members)")
    s = summary(analysis)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["groups"].items()))
    lines.append("")
    lines.append(f"{s['model_class']}: {s['total_params']:,} parameters = "
                 f"{s['prunable_params']:,} prunable ({100 * s['prunable_share']:.1f}%) + "
                 f"{s['fixed_params']:,} fixed; groups: {kinds}")
    lines.extend(fallback_text(analysis))
    lines.extend(f"note: {n}" for n in s["notes"])
    lines.append(f"capture {s['seconds'].get('capture', 0):.1f}s, analysis "
                 f"{s['seconds'].get('analysis', 0):.2f}s")
    return "\n".join(lines)


def to_json(analysis) -> dict:
    data = analysis.to_dict()
    data["aliases"] = {k: v for k, v in analysis.graph.aliases.items() if len(v) > 1}
    return data


def to_networkx(analysis) -> nx.DiGraph:
    g = nx.DiGraph()
    for group in analysis.groups:
        g.add_node(group.name, type="group", kind=group.kind, size=group.size,
                   prunable=group.prunable, params_per_unit=group.params_per_unit)
        for m in group.members:
            if m.param not in g:
                g.add_node(m.param, type="param", shape=list(analysis.graph.shapes[m.param]),
                           aliases=analysis.graph.aliases.get(m.param, [m.param]))
            g.add_edge(group.name, m.param, dim=m.dim, role=m.role, offset=m.offset,
                       inner=m.inner, div=m.div, expert_dim=m.expert_dim)
    return g


_COLORS = {"heads": "#4e79a7", "channels": "#59a14f", "experts": "#e15759",
           "expert_channels": "#f28e2b", "shared_expert_channels": "#b07aa1",
           "hidden": "#9c9c9c", "vocab": "#bab0ac"}


def to_dot(analysis, include_pinned: bool = True) -> str:
    """Graphviz source: groups (coloured by kind) linked to the parameters they slice."""
    g = to_networkx(analysis)
    lines = ["digraph prunegraph {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    for node, data in g.nodes(data=True):
        if data["type"] == "group":
            if not include_pinned and not data["prunable"]:
                continue
            color = _COLORS.get(data["kind"], "#76b7b2")
            label = f"{node}\\n{data['kind']} x{data['size']}"
            lines.append(f'  "{node}" [shape=box, style=filled, fillcolor="{color}", label="{label}"];')
        else:
            lines.append(f'  "{node}" [shape=ellipse, label="{node}\\n{data["shape"]}"];')
    for a, b, data in g.edges(data=True):
        if not include_pinned and not g.nodes[a]["prunable"]:
            continue
        lines.append(f'  "{a}" -> "{b}" [label="dim {data["dim"]} {data["role"]}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines)


def to_html(analysis) -> str:
    """A self-contained page: summary, a filterable table of groups, members on click."""
    s = summary(analysis)
    data = json.dumps(to_json(analysis))
    kinds = "".join(f"<li><b>{html.escape(k)}</b>: {n}</li>" for k, n in sorted(s["groups"].items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>prunegraph: {html.escape(s['model_class'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
tr.group:hover {{ background: #f4f4f4; cursor: pointer; }}
tr.members td {{ background: #fafafa; font-family: monospace; font-size: 12px; }}
.kind {{ padding: 1px 6px; border-radius: 3px; color: white; }}
.pinned {{ color: #888; }}
input {{ padding: 4px; width: 30em; margin: 1em 0; }}
.bar {{ height: 14px; background: #4e79a7; display: inline-block; vertical-align: middle; }}
.bar.off {{ background: repeating-linear-gradient(90deg, #9c9c9c 0 6px, #ddd 6px 9px); }}
</style></head><body>
<h1>{html.escape(s['model_class'])}</h1>
<p>{s['total_params']:,} parameters: <b>{s['prunable_params']:,}</b> in prunable groups,
{s['fixed_params']:,} fixed ({100 * s['prunable_params'] / max(1, s['total_params']):.1f}% prunable).</p>
<ul>{kinds}</ul>
<input id="filter" placeholder="filter groups (name or kind)..." oninput="render()">
<p>Bars: parameters per group, scaled to the largest prunable group (pinned groups larger
than that are drawn capped and hatched).</p>
<table><thead><tr><th>group</th><th>kind</th><th>size</th><th>params / unit</th><th>params</th>
<th>constraints</th></tr></thead><tbody id="rows"></tbody></table>
<script>
const DATA = {data};
const COLORS = {json.dumps(_COLORS)};
const open = new Set();
function constraints(g) {{
  const c = g.constraints, out = [];
  if (c.pinned) out.push('pinned: ' + c.pinned_reason);
  if (c.kv_heads !== undefined) out.push(`kv_heads=${{c.kv_heads}} q_per_kv=${{c.q_per_kv}} head_dim=${{c.head_dim}}`);
  if (c.experts !== undefined) out.push('per expert x' + c.experts);
  if (c.removal === 'mask_logit') out.push('routed, min ' + c.min_units);
  return out.join('; ');
}}
function render() {{
  const f = document.getElementById('filter').value.toLowerCase();
  const body = document.getElementById('rows');
  body.innerHTML = '';
  // Bars are scaled to the largest *prunable* group: a pinned group (the hidden size, the
  // vocabulary) can be far larger and would flatten every other bar; it is drawn capped.
  const size = g => g.params_per_unit * g.size * (g.constraints.experts || 1);
  const prunable = DATA.groups.filter(g => !g.constraints.pinned).map(size);
  const maxp = Math.max(1, ...(prunable.length ? prunable : DATA.groups.map(size)));
  DATA.groups.forEach((g, i) => {{
    if (f && !(g.name.toLowerCase().includes(f) || g.kind.includes(f))) return;
    const total = size(g);
    const off = total > maxp;
    const tr = document.createElement('tr');
    tr.className = 'group' + (g.constraints.pinned ? ' pinned' : '');
    tr.innerHTML = `<td>${{g.name}}</td><td><span class="kind" style="background:${{COLORS[g.kind] || '#76b7b2'}}">${{g.kind}}</span></td>
      <td>${{g.size}}</td><td>${{Math.round(g.params_per_unit).toLocaleString()}}</td>
      <td><span class="bar${{off ? ' off' : ''}}" title="${{off ? 'larger than the largest prunable group (bar capped)' : ''}}" style="width:${{Math.max(2, Math.min(160, 160 * total / maxp))}}px"></span> ${{Math.round(total).toLocaleString()}}</td>
      <td>${{constraints(g)}}</td>`;
    tr.onclick = () => {{ open.has(i) ? open.delete(i) : open.add(i); render(); }};
    body.appendChild(tr);
    if (open.has(i)) {{
      const m = document.createElement('tr');
      m.className = 'members';
      m.innerHTML = '<td colspan="6">' + g.members.map(x =>
        `${{x.param}} dim ${{x.dim}} [${{x.role}}] offset ${{x.offset}} block ${{x.inner}}` +
        (x.div > 1 ? ` shared by ${{x.div}} units` : '') +
        (x.expert_dim !== undefined ? ` per expert (dim ${{x.expert_dim}})` : '')).join('<br>') + '</td>';
      body.appendChild(m);
    }}
  }});
}}
render();
</script></body></html>
"""
