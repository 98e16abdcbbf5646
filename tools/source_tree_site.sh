#!/usr/bin/env bash
# Make this source tree importable as the installed package, without pip or a network:
# copies prunegraph/, passes/ and targets/ into DEST with the package mapping of pyproject.toml
# (passes -> prunegraph.passes, targets -> prunegraph.targets) and writes a dist-info so that the
# plugin entry points are found. For machines that cannot build the package (no index, an older
# setuptools). Usage: eval "$(tools/source_tree_site.sh /tmp/pg)"   # prints the export line
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/tmp/prunegraph-site}
rm -rf "$dest"; mkdir -p "$dest"
cp -r "$root/prunegraph" "$dest/prunegraph"
rm -rf "$dest/prunegraph/passes" "$dest/prunegraph/targets"
cp -r "$root/passes" "$dest/prunegraph/passes"
cp -r "$root/targets" "$dest/prunegraph/targets"
info="$dest/prunegraph-0.0.0.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: prunegraph\nVersion: 0.0.0\n' > "$info/METADATA"
python3 - "$root/pyproject.toml" "$info/entry_points.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
out = []
for section in ("project.entry-points.\"prunegraph.plugins\"", "project.scripts"):
    m = re.search(r"^\[" + re.escape(section) + r"\]\n((?:[^\[\n].*\n?)*)", text, re.M)
    if m:
        name = "prunegraph.plugins" if "plugins" in section else "console_scripts"
        out.append(f"[{name}]\n" + "".join(l.replace('"', "") .replace(" = ", "=") + "\n"
                                            for l in m.group(1).splitlines() if l.strip()))
open(sys.argv[2], "w").write("\n".join(out))
PY
echo "export PYTHONPATH=$dest\${PYTHONPATH:+:\$PYTHONPATH}"
