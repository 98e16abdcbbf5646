"""tools/extract_austen.py: chapters, paragraphs and reading the Debian package."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from extract_austen import _rdata_files, chapters  # noqa: E402

LINES = ["NOVEL", "", "by", "Jane Austen", "", "ADVERTISEMENT", "front matter text", "",
         "VOLUME I", "", "CHAPTER I", "", "First line of a paragraph", "that goes on  here.", "",
         "Second paragraph.", "", "", "CHAPTER II", "", "Only one.", "", "VOLUME II", "",
         "Chapter 1", "", "Third chapter text.", "", "THE END", "", "A note by an editor."]


def test_chapters_join_wrapped_lines_and_drop_front_and_end_matter():
    out = chapters("Novel", LINES)
    assert out == [
        {"title": "Novel, Chapter 1",
         "text": "First line of a paragraph that goes on here.\n\nSecond paragraph."},
        {"title": "Novel, Chapter 2", "text": "Only one."},
        {"title": "Novel, Chapter 3", "text": "Third chapter text."},  # numbered in the book
    ]
    assert chapters("Novel", ["no chapter heading", "at all"]) == []


def _deb(tmp_path, members):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = bytearray(b"!<arch>\n")
    for name, payload in (("debian-binary", b"2.0\n"), ("data.tar.xz", data.getvalue())):
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        out += payload + (b"\n" if len(payload) % 2 else b"")
    path = tmp_path / "pkg.deb"
    path.write_bytes(bytes(out))
    return path


def test_reads_rdata_from_a_deb_or_a_folder(tmp_path):
    lib = "./usr/lib/R/site-library/janeaustenr/data/"
    deb = _deb(tmp_path, {lib + "Rdata.rdx": b"index", lib + "Rdata.rdb": b"database"})
    assert _rdata_files(deb) == (b"index", b"database")
    folder = tmp_path / "janeaustenr" / "data"
    folder.mkdir(parents=True)
    (folder / "Rdata.rdx").write_bytes(b"i")
    (folder / "Rdata.rdb").write_bytes(b"d")
    assert _rdata_files(folder.parent) == (b"i", b"d")
    with pytest.raises(SystemExit, match="does not hold janeaustenr"):
        _rdata_files(_deb(tmp_path, {"./other/file": b"x"}))
    with pytest.raises(SystemExit, match="not a .deb"):
        _rdata_files(folder / "Rdata.rdx")
