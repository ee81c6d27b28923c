"""Rules every side shares, each with one home: names as they are shown (protocol.names), --server addresses
(protocol.address), what a .blend starts with (protocol.blendfile) and how a file enters the content store."""

from __future__ import annotations

import gzip
import stat
import zipfile
from pathlib import Path

import pytest
import zstandard

from protocol.address import AddressError, parse_server
from protocol.blendfile import MAGIC_BYTES, looks_like_blend
from protocol.limits import MAX_NAME_CHARS
from protocol.names import clean_file_name, clean_name
from protocol.stream import sha256_file
from server_addon.core.confine import compression
from server_addon.core.storage import ContentStore

pytestmark = pytest.mark.unit  # (the one test using generated scenes is lifted by its fixture)

# --- names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "shown"), [
    ("render-01", "render-01"),
    ("  padded  ", "padded"),
    ("two\nlines\r", "twolines"),
    ("\x1b[31mred\x1b[0m", "[31mred[0m"),  # no escape code reaches a terminal or a log
    ("zero\u200bwidth\u202eflip", "zerowidthflip"),
    ("Ünïcødé 名前", "Ünïcødé 名前"),
    ("\t\n", ""),
])
def test_a_name_is_printable_one_line_and_trimmed(text: str, shown: str) -> None:
    assert clean_name(text) == shown


def test_a_name_is_bounded() -> None:
    assert clean_name("x" * (MAX_NAME_CHARS + 50)) == "x" * MAX_NAME_CHARS
    assert clean_name(" " + "y" * MAX_NAME_CHARS + " ") == "y" * MAX_NAME_CHARS, "trimmed before it is cut"
    assert clean_name("abcdef", limit=3) == "abc"


@pytest.mark.parametrize(("name", "shown"), [
    ("shot.blend", "shot.blend"),
    ("C:\\Users\\ann\\shot 010.blend", "shot 010.blend"),
    ("project/scenes/main.blend", "main.blend"),
    ("../../etc/passwd\n", "passwd"),
    ("folder/", ""),
])
def test_a_file_name_keeps_its_last_part_only(name: str, shown: str) -> None:
    assert clean_file_name(name) == shown


# --- --server addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "address"), [
    ("farm.local:9090", ("farm.local", 9090)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("fe80::1%eth0:9090", ("fe80::1%eth0", 9090)),
])
def test_a_server_address_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert parse_server(text) == address


@pytest.mark.parametrize(("text", "error"), [
    ("farm.local", r"^--server wants HOST:PORT, not 'farm.local'$"),
    (":9090", "wants HOST:PORT"),
    ("farm:http", r"^--server port 'http' is not a number$"),
    ("farm:", "is not a number"),
    ("farm:+80", "is not a number"),
    ("farm:٩٠", "is not a number"),  # digits, but not ASCII ones
    ("farm:0", r"^--server port 0 is not between 1 and 65535$"),
    ("farm:65536", "not between 1 and 65535"),
])
def test_a_bad_server_address_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(AddressError, match=error):
        parse_server(text)
    with pytest.raises(ValueError, match="--farm-server"):
        parse_server(text, option="--farm-server")


# --- what a .blend starts with ---------------------------------------------------------------------------


def test_real_blend_files_and_their_compressed_forms_look_like_blends(scenes, tmp_path: Path) -> None:
    saved = scenes("anim12", "--frames", "12", "--size", "64x36", "--samples", "4").read_bytes()
    assert saved.startswith(b"BLENDER") and looks_like_blend(saved[:MAGIC_BYTES])  # the test venv's bpy saves plain
    for form, packed in (("zstd", zstandard.ZstdCompressor().compress(saved)), ("gzip", gzip.compress(saved))):
        # What Blender 3.0+ (zstd) and older Blenders (gzip) write with "Compress" on.
        assert compression(packed[:4]) == form and looks_like_blend(packed[:MAGIC_BYTES]), form
    archive = tmp_path / "project.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("shot.blend", saved)
    for other in (archive.read_bytes(), b"", b"BLEND", b"\x89PNG\r\n\x1a\n", "BLENDER".encode("utf-16")):
        assert not looks_like_blend(other[:MAGIC_BYTES]), other[:8]


# --- the content store -----------------------------------------------------------------------------------


def test_moved_in_and_committed_files_are_stored_read_only(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    copy = store.root / ".incoming-copy.blend"  # a file saved inside the store's folder (the add-on's copy)
    copy.write_bytes(b"BLENDER-v405 the artist's scene")
    sha = sha256_file(copy)
    stored = store.move_in(copy, sha)
    assert stored == store.path(sha) and not copy.exists() and store.has(sha, 31)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444

    data = b"a texture's bytes" * 1000
    sink = store.sink(sha256_file(_write(tmp_path / "texture.png", data)), len(data))
    sink.write(data)
    digest = sink.finish(sink.expected or "")
    committed = store.commit(sink, digest)
    assert committed.read_bytes() == data and stat.S_IMODE(committed.stat().st_mode) == 0o444
    assert {p.name for p in store.root.iterdir()} == {sha, digest}, "no partial file left"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
