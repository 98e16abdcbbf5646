"""Extract chapters of Jane Austen's novels into ``prunegraph/data/austen.jsonl.xz``.

prunegraph ships the result as its built-in *out-of-domain* evaluation text
(``load_documents("austen")``): early-19th-century English fiction, dialogue-heavy, far from the
encyclopaedic Wikipedia text that calibrates pruning. The novels are in the public domain (Project
Gutenberg transcriptions); they come from the Debian package ``r-cran-janeaustenr`` (the CRAN
package ``janeaustenr`` by Julia Silge, MIT licence), which stores one character vector of text
lines per novel in R's lazy-load database ``data/Rdata.rdb``/``Rdata.rdx``. The R serialization
format is read with the ``rdata`` package (``pip install 'prunegraph[data-tools]'``); the ``.deb``
is read with the standard library (an ``ar`` archive holding ``data.tar.xz``).

Each chapter becomes one document titled ``"<Novel>, Chapter <n>"``. The front matter (title,
author, the author's advertisement), the closing word (``Finis``, ``THE END``) and anything
after it (Northanger Abbey's transcription ends with an editor's note) are dropped; the
transcription's hard line breaks are joined, so a paragraph is one line, paragraphs are separated
by a blank line and runs of spaces become one space. The words are unchanged.

Usage::

    apt-get download r-cran-janeaustenr          # r-cran-janeaustenr_1.0.0-1_all.deb
    python tools/extract_austen.py r-cran-janeaustenr_1.0.0-1_all.deb \\
        --out prunegraph/data/austen.jsonl.xz

The argument may also be the package's folder (``/usr/lib/R/site-library/janeaustenr`` once the
package is installed), or any folder holding ``data/Rdata.rdx`` and ``data/Rdata.rdb``.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import re
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

__all__ = ["NOVELS", "read_lazyload_db", "chapters", "main"]

#: R object name -> the novel's title. Persuasion and Northanger Abbey by default: the two
#: shortest complete novels, about 160 K words (210 K SmolLM2 tokens) together.
NOVELS = {"persuasion": "Persuasion", "northangerabbey": "Northanger Abbey",
          "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
          "mansfieldpark": "Mansfield Park", "emma": "Emma"}
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.I)
_VOLUME = re.compile(r"^\s*volume\s+([0-9]+|[ivxlc]+)\.?\s*$", re.I)
#: The book ends at its closing word, or where an editor's note follows the text.
_CLOSING = re.compile(r"^\s*(finis|the end|a note on the text)\.?\s*$", re.I)
_ROMAN = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}


def _roman_or_int(token: str) -> int:
    if token.isdigit():
        return int(token)
    values = [_ROMAN[c] for c in token.lower()]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v
               for i, v in enumerate(values))


def _rdata_files(source: Path) -> tuple[bytes, bytes]:
    """``(Rdata.rdx, Rdata.rdb)`` bytes from a ``.deb`` file or a package folder."""
    if source.is_dir():
        for data in (source / "data", source):
            if (data / "Rdata.rdx").is_file():
                return (data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes()
        raise SystemExit(f"{source} holds no data/Rdata.rdx: give the janeaustenr package folder "
                         f"or the r-cran-janeaustenr .deb")
    raw = source.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SystemExit(f"{source} is not a .deb (ar archive) nor a folder")
    pos, members = 8, {}
    while pos + 60 <= len(raw):  # ar member: 60-byte header, data, padding to an even offset
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58].decode().strip())
        members[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise SystemExit(f"{source} has no data.tar member; is it a Debian package?")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for m in tar.getmembers():
            if m.name.endswith(("janeaustenr/data/Rdata.rdx", "janeaustenr/data/Rdata.rdb")):
                found[m.name.rsplit(".", 1)[1]] = tar.extractfile(m).read()
    if set(found) != {"rdx", "rdb"}:
        raise SystemExit(f"{source} does not hold janeaustenr/data/Rdata.rd[xb]; pass the "
                         f"r-cran-janeaustenr package")
    return found["rdx"], found["rdb"]


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Every character vector of an R lazy-load database, by object name.

    The index (``.rdx``) is a serialized R list whose ``variables`` map each name to an
    ``(offset, length)`` record in ``.rdb``; a record is a 4-byte big-endian length followed by
    the zlib-compressed serialization of the object.
    """
    import rdata  # noqa: PLC0415  (a tool-only dependency: prunegraph[data-tools])

    with warnings.catch_warnings():  # rdata warns that an index "looks like" an .rds file
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(_maybe_gunzip(rdx)))
        out = {}
        for name, (offset, length) in index["variables"].items():
            record = rdb[int(offset):int(offset) + int(length)]
            value = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
            out[str(name)] = [str(x) if x is not None else "" for x in value]
    return out


def _maybe_gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _paragraphs(lines: list[str]) -> str:
    """Hard-wrapped lines -> one line per paragraph, paragraphs separated by a blank line."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)))
            current = []
    return "\n\n".join(paragraphs)


def chapters(title: str, lines: list[str]) -> list[dict[str, str]]:
    """The novel's chapters as ``{"title", "text"}`` records (front and end matter dropped).

    Chapter numbers restart in each volume of some novels, so titles number chapters by their
    position in the book.
    """
    out, body = [], None
    for line in lines:
        if _CHAPTER.match(line):
            if body is not None:
                out.append(body)
            body = []
        elif _CLOSING.match(line):
            break
        elif _VOLUME.match(line):
            continue
        elif body is not None:
            body.append(line)
    if body is not None:
        out.append(body)
    records = [{"title": f"{title}, Chapter {i + 1}", "text": _paragraphs(b)}
               for i, b in enumerate(out)]
    return [r for r in records if r["text"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="r-cran-janeaustenr .deb file, or the package folder")
    parser.add_argument("--novels", default="persuasion,northangerabbey",
                        help=f"comma-separated novels among {', '.join(NOVELS)}")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                             / "prunegraph" / "data" / "austen.jsonl.xz"))
    args = parser.parse_args(argv)
    source = Path(args.package)
    if not source.exists():
        parser.error(f"{source} does not exist; get it with `apt-get download r-cran-janeaustenr`")
    novels = [n.strip() for n in args.novels.split(",") if n.strip()]
    unknown = [n for n in novels if n not in NOVELS]
    if unknown or not novels:
        parser.error(f"unknown novel(s) {unknown}; choose among {', '.join(NOVELS)}")

    db = read_lazyload_db(*_rdata_files(source))
    records = [r for n in novels for r in chapters(NOVELS[n], db[n])]
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    os.replace(tmp, args.out)
    words = sum(len(r["text"].split()) for r in records)
    print(f"{len(records)} chapters of {', '.join(NOVELS[n] for n in novels)}: {words:,} words, "
          f"{Path(args.out).stat().st_size / 1e3:.0f} KB compressed -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
