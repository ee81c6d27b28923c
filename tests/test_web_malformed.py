"""Malformed job uploads over real HTTP: each answered 400 (or 413/415) with a sentence, never 500 and a traceback,
and the farm goes on taking a well-formed upload afterwards."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import pytest
from conftest import Farm
from web_support import Http, start_web_on, stop_web

# (aiohttp warns of a disposition it cannot parse, then leaves out what it could not read)
pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader"),
              pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam")]

BLEND = b"BLENDER-v500" + bytes(range(256)) * 16
B = "----microfarmTESTBOUNDARY"
CT = f"multipart/form-data; boundary={B}"


def _part(headers: bytes, data: bytes) -> bytes:
    return f"--{B}\r\n".encode() + headers + b"\r\n\r\n" + data + b"\r\n"


def _file(filename: bytes, data: bytes = BLEND, name: bytes = b"file", extra: bytes = b"") -> bytes:
    return _part(b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"'
                 + b"\r\nContent-Type: application/octet-stream" + extra, data)


END = f"--{B}--\r\n".encode()

#: (what, content type, body): every one a client error, none a server error (except those in TOLERATED).
CASES = [
    ("a raw newline in a file name", CT, _file(b"a\nb.blend") + END),
    ("a raw CR in a file name", CT, _file(b"a\rb.blend") + END),
    ("CR LF in a file name", CT, _file(b"a\r\nb.blend") + END),
    ("a raw newline in a folder file's name", CT, _file(b"shot\n.blend", name=b"files") + END),
    ("a part header without a colon", CT, _part(b'Content-Disposition: form-data; name="file"\r\nnonsense', BLEND)
     + END),
    ("an unclosed quote in the disposition", CT, _part(b'Content-Disposition: form-data; name="file; filename="x',
                                                        BLEND) + END),
    ("a part without a disposition", CT, _part(b"Content-Type: text/plain", b"1") + END),
    ("an unknown transfer encoding", CT, _file(b"s.blend", extra=b"\r\nContent-Transfer-Encoding: rot13") + END),
    ("a base64 part that is not base64", CT, _file(b"s.blend", b"!!!not base64!!!",
                                                   extra=b"\r\nContent-Transfer-Encoding: base64") + END),
    ("a gzip part that is not gzip", CT, _file(b"s.blend", BLEND, extra=b"\r\nContent-Encoding: gzip") + END),
    ("a part in an unknown content encoding", CT, _file(b"s.blend", BLEND, extra=b"\r\nContent-Encoding: lzw")
     + END),
    ("a body cut off before its end", CT, _file(b"s.blend")[:-40]),
    ("a body without its closing boundary", CT, _file(b"s.blend")),
    ("a body that is not multipart at all", CT, b"\x00\xff" * 300),
    ("a body with another boundary", CT, _file(b"s.blend").replace(B.encode(), b"----other") + END),
    ("no boundary in the content type", "multipart/form-data", _file(b"s.blend") + END),
    ("an empty boundary", "multipart/form-data; boundary=", _file(b"s.blend") + END),
    ("a file name in bad UTF-8", CT, _file(b"\xff\xfe.blend") + END),
    ("a field name in bad UTF-8", CT, _part(b'Content-Disposition: form-data; name="\xff"', b"1") + END),
    ("a settings field with a raw newline in its name", CT,
     _part(b'Content-Disposition: form-data; name="frame\nstart"', b"1") + END),
    ("a very long part header", CT, _part(b"X-Long: " + b"a" * 20000, BLEND) + END),
    ("an RFC 2231 file name in an unknown charset", CT,
     _part(b"Content-Disposition: form-data; name=\"file\"; filename*=nosuch''s.blend", BLEND) + END),
    ("an RFC 2231 file name with bad percent escapes", CT,
     _part(b"Content-Disposition: form-data; name=\"file\"; filename*=utf-8''%ff%fe%zz.blend", BLEND) + END),
    ("a part with a charset that does not exist", CT,
     _part(b'Content-Disposition: form-data; name="frame_start"\r\nContent-Type: text/plain; charset=nosuch', b"1")
     + END),
    ("a gzip part inside a gzip body", CT, _file(b"s.blend", gzip.compress(b"x" * 10) + b"junk",
                                                 extra=b"\r\nContent-Encoding: gzip") + END),
]

#: Read as sent where a reading exists: the part's bytes are taken raw (the encodings a browser never sends are not
#: applied, and the file is then checked as a .blend like any other), a file name that cannot be decoded is cleaned.
TOLERATED = {'an unknown transfer encoding',
             'a gzip part that is not gzip',
             'a part in an unknown content encoding',
             'a file name in bad UTF-8',
             'an RFC 2231 file name in an unknown charset',
             'an RFC 2231 file name with bad percent escapes'}


@pytest.fixture
def web(farm: Farm) -> Iterator[Http]:
    server = start_web_on(farm)
    yield Http(server.port)
    stop_web(farm, server)


@pytest.mark.parametrize(("what", "content_type", "body"), CASES, ids=[case[0] for case in CASES])
def test_a_malformed_upload_is_a_client_error(farm: Farm, web: Http, what: str, content_type: str,
                                              body: bytes) -> None:
    reply = web.request("POST", "/api/jobs", body, {"Content-Type": content_type})
    if what in TOLERATED:
        assert reply.status == 201, (what, reply.status, reply.body[:300])
        name = reply.json()["job"]["name"]
        assert name.isprintable(), name
    else:
        assert 400 <= reply.status < 500, (what, reply.status, reply.body[:300])
        assert reply.error and "Traceback" not in reply.error, reply.body[:300]
        assert reply.error.isprintable(), reply.error
        # The farm is unharmed: nothing was created, and a well-formed upload still works.
        assert farm.call(lambda s: len(s.farm.jobs)) == 0
    good = web.upload(BLEND, filename="shot.blend")
    assert good.status == 201, good.body[:300]
