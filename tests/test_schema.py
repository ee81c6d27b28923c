"""The one validator of protocol.schema: specs, records, the field path in every refusal, and what the
protocol's parsers make of malformed input (never anything but a ProtocolError)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from typing import Annotated, Any

import msgpack
import pytest

from protocol import messages as m
from protocol.assets import MissingFile, missing_from_wire
from protocol.errors import ProtocolError
from protocol.framing import decode_body, encode, read_frame
from protocol.manifest import Manifest, ManifestError, ProjectFile
from protocol.schema import (
    Bool,
    Bytes,
    Float,
    Int,
    ListOf,
    OpenMap,
    Record,
    Rule,
    SchemaError,
    Str,
    Value,
    record_of,
    validate,
)
from protocol.settings import JobRequest, SceneInfo, SettingsError, validate_assignment
from protocol.tiles import TileSpec

pytestmark = pytest.mark.unit

SHA = "ab" * 32
TIMEOUT = 2.0


def refusal(spec: Any, value: Any, **context: Any) -> SchemaError:
    with pytest.raises(SchemaError) as caught:
        validate(spec, value, **context)
    return caught.value


# --- specs --------------------------------------------------------------------------------------------

def test_a_whole_number_is_an_int_and_no_bool_within_its_bounds() -> None:
    spec = Int(1, 10)
    assert validate(spec, 1) == 1 and validate(spec, 10) == 10
    for bad in (True, 3.0, "3", None, b"3", [3]):
        assert "must be a whole number" in str(refusal(spec, bad))
    assert str(refusal(spec, 11)) == "the value must be between 1 and 10, not 11"
    assert "between 1 and 10" in str(refusal(spec, 0))


def test_a_float_is_finite_an_int_will_do_and_above_is_exclusive() -> None:
    spec = Float(0, 5.0)
    assert validate(spec, 0) == 0 and validate(spec, 2.5) == 2.5
    for bad in (math.nan, math.inf, -math.inf):
        assert "not a finite number" in str(refusal(spec, bad))
    assert "must be a number" in str(refusal(spec, False))
    assert "between 0 and 5.0" in str(refusal(spec, 5.5))
    rate = Float(above=0, high=10.0)
    assert validate(rate, 1e-9) == 1e-9
    with pytest.raises(SchemaError):
        validate(rate, 0.0)


def test_text_and_bytes_are_bounded_chosen_matched_and_printable() -> None:
    assert validate(Str(min_len=1, max_len=3), "abc") == "abc"
    assert "between 1 and 3 long, not 4 long" in str(refusal(Str(min_len=1, max_len=3), "abcd"))
    assert "at least 1 long, not 0 long" in str(refusal(Str(min_len=1), ""))
    assert str(refusal(Str(choices=["a", "b"]), "c")) == "the value must be one of a, b, not 'c'"
    assert validate(Str(pattern=r"[0-9a-f]{4}"), "00ff") == "00ff"
    refusal(Str(pattern=r"[0-9a-f]{4}"), "00ffx")
    refusal(Str(printable=True), "line\nbreak")
    assert "must be text, not bytes" in str(refusal(Str(), b"x"))
    assert validate(Bytes(min_len=2, max_len=2), b"ab") == b"ab"
    refusal(Bytes(min_len=2, max_len=2), b"abc")
    refusal(Bytes(), "text")
    assert validate(Bool(), False) is False
    refusal(Bool(), 0)


def test_a_check_of_its_own_runs_after_the_type_and_may_raise_its_own_error() -> None:
    even = Int(check=lambda n: n % 2 == 0)
    assert validate(even, 4) == 4
    assert "not in the form" in str(refusal(even, 3))

    def named(value: Any) -> Any:
        if value != "ok":
            raise ManifestError(f"not ok: {value!r}")
        return value

    with pytest.raises(ManifestError, match="not ok: 'no'"):
        validate(Value(check=named), "no")


def test_nothing_hides_a_nan_in_an_open_map_however_deep() -> None:
    assert validate(OpenMap(), {"a": [1, {"b": 2.5}]}) == {"a": [1, {"b": 2.5}]}
    deep: Any = math.inf
    for _ in range(10_000):  # nested far beyond the recursion limit: checked without recursion
        deep = [deep]
    assert "not a finite number" in str(refusal(OpenMap(), {"x": deep}))
    refusal(OpenMap(), {1: "int key"})
    refusal(OpenMap(), ["not", "a", "map"])


# --- records and paths --------------------------------------------------------------------------------

ITEM = Record({"sha256": Str(pattern="[0-9a-f]{64}"), "size": Int(0)})
ORDER = Record({
    "id": Str(max_len=8),
    "items": ListOf(ITEM, max_len=3),
    "note": Str(optional=True, nullable=True),
    "rush": Bool(optional=True, absent_if_none=True),
}, rules=[Rule(lambda v: v["id"] != "void", "order {id} may not be placed")])


def test_a_record_checks_its_fields_ignores_unknown_keys_and_leaves_out_absent_optional_ones() -> None:
    order = {"id": "o1", "items": [{"sha256": SHA, "size": 1, "extra": "?"}], "future": 1, "rush": None}
    assert validate(ORDER, order) == {"id": "o1", "items": [{"sha256": SHA, "size": 1}]}
    assert validate(ORDER, {**order, "note": None})["note"] is None
    error = refusal(ORDER, {"items": []})
    assert (str(error), error.path) == ("id is missing", "id")


def test_the_error_names_the_path_of_the_field() -> None:
    order = {"id": "o1", "items": [{"sha256": SHA, "size": 1}, {"sha256": "x", "size": 1}]}
    error = refusal(ORDER, order)
    assert error.path == "items[1].sha256" and str(error).startswith("items[1].sha256 ")
    assert refusal(ORDER, {**order, "items": [{"sha256": SHA, "size": -1}]}).path == "items[0].size"
    assert refusal(ORDER, {**order, "items": [{}] * 4}).path == "items"
    assert refusal(ORDER, {"id": "o2", "items": [], "note": 5}).path == "note"
    rule = refusal(ORDER, {"id": "void", "items": []})
    assert (str(rule), rule.path) == ("order void may not be placed", "")


def test_templates_word_a_problem_where_the_nearest_record_or_spec_says_how() -> None:
    worded = Record({"n": Int(0, 3), "tag": Str(message="tag {value!r} of {record[n]} is wrong")},
                    messages={"type": "{kind}: bad {name!r} ({what})", "range": "{kind}: {name} out of {low}..{high}"})
    assert str(refusal(worded, {"n": "x"}, kind="k")) == "k: bad 'n' (str)"
    assert str(refusal(worded, {"n": 2.5}, kind="k")) == "k: bad 'n' (2.5)"  # a float is shown as itself
    assert str(refusal(worded, {"n": 9}, kind="k")) == "k: n out of 0..3"
    assert str(refusal(worded, {"n": 1, "tag": 7}, kind="k")) == "tag 7 of 1 is wrong"


def test_an_error_class_can_come_from_the_caller_or_from_a_spec() -> None:
    assert type(refusal(Int(), "x")) is SchemaError
    with pytest.raises(SettingsError):
        validate(Int(), "x", error=SettingsError)
    with pytest.raises(ManifestError):
        validate(Record({"f": Int(error=ManifestError)}), {"f": "x"})
    assert issubclass(SettingsError, ValueError) and issubclass(ManifestError, ProtocolError)


@dataclasses.dataclass(frozen=True)
class Shot:
    name: Annotated[str, Str(max_len=4)]
    frames: list[int]
    fps: Annotated[float, Float(above=0)] = 24.0
    camera: str | None = None


def test_a_dataclass_declares_its_record_in_its_type_hints() -> None:
    record = record_of(Shot)
    assert Shot(**validate(record, {"name": "a", "frames": [1, 2]})) == Shot("a", [1, 2])
    assert validate(record, {"name": "a", "frames": [], "camera": None}) == {"name": "a", "frames": [],
                                                                               "camera": None}
    assert refusal(record, {"name": "abcde", "frames": []}).path == "name"
    assert refusal(record, {"name": "a", "frames": [1, True]}).path == "frames[1]"
    assert refusal(record, {"name": "a", "frames": [], "fps": 0}).path == "fps"
    assert refusal(record, {"frames": []}).path == "name"


# --- the protocol's messages through real frames ----------------------------------------------------------

async def through_frames(payload: dict[str, Any]) -> m.Message:
    reader = asyncio.StreamReader()
    reader.feed_data(encode(payload))
    reader.feed_eof()
    return m.from_wire(await asyncio.wait_for(read_frame(reader), TIMEOUT))


MESSAGES = [
    m.Hello(version=1, role="worker", name="box", nonce=bytes(32), devices=["CPU", "OPTIX"]),
    m.Accepted(client_id="c1", heartbeat_s=2.5),
    m.FrameBegin(lease_id=1, job_id="j", frame=-3, ext="png", size=10, render_s=0.5, warnings=["w"]),
    m.Assign(lease_id=2, job_id="j", blend_sha256=SHA, blend_size=3, frames=[1, 2],
             settings={"file_format": "PNG", "split": None},
             files=[{"relpath": "shot.blend", "sha256": SHA, "size": 3}], main="shot.blend"),
    m.UploadReady(need_bytes=True, need=[SHA]),
    m.ProbeResult(lease_id=3, ok=True, scene={"fps": 24.0, "missing": []}),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: message.TYPE.value)
async def test_messages_survive_a_round_trip_through_frames(message: m.Message) -> None:
    assert await through_frames(message.to_wire()) == message


@pytest.mark.asyncio
@pytest.mark.parametrize("payload, path, words", [
    ({**MESSAGES[2].to_wire(), "render_s": math.nan}, "render_s", "frame_begin message has a bad 'render_s': nan"),
    ({**MESSAGES[2].to_wire(), "render_s": -1}, "render_s", "has a 'render_s' of -1, not between 0 and"),
    ({**MESSAGES[2].to_wire(), "warnings": ["ok", 3]}, "warnings[1]", "frame_begin message has a bad 'warnings': list"),
    ({**MESSAGES[3].to_wire(), "frames": [1, 2.0]}, "frames[1]", "assign message has a bad 'frames'"),
    ({**MESSAGES[1].to_wire(), "heartbeat_s": 7200}, "heartbeat_s", "'heartbeat_s' of 7200, not between 0 and 3600"),
    ({"t": "probe_result", "lease_id": 1, "ok": True, "scene": {"x": [math.inf]}}, "scene",
     "bad 'scene': dict holding a number that is not finite"),
    ({"t": "upload_ready", "need_bytes": True, "need": ["ab"]}, "need[0]", "upload_ready asks for more files"),
    ({"t": "lease_done"}, "lease_id", "lease_done message lacks field 'lease_id'"),
])
async def test_a_bad_field_is_refused_naming_its_path(payload: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SchemaError) as caught:
        await through_frames(payload)
    assert caught.value.path == path and words in str(caught.value), str(caught.value)


def test_the_upload_answer_a_server_builds_is_held_to_the_same_rule() -> None:
    with pytest.raises(ManifestError, match="upload_ready asks"):
        m.UploadReady(need_bytes=True, need=["not a sha"])


# --- fuzz: malformed input of every shape, and only ProtocolError comes out --------------------------------

SCENE = SceneInfo(scene="S", engine="CYCLES", frame_start=1, frame_end=4, frame_step=1, fps=24.0, resolution_x=64,
                  resolution_y=36, percentage=100, file_format="PNG",
                  missing=(MissingFile("//a.png", "image", "a"),), missing_total=1)
SPLIT = {"frame": 1, "tiles": 2, "height": 36, "margin": 0}
MANIFEST = [ProjectFile("shot.blend", SHA, 3).to_wire(), ProjectFile("tex/a.png", "cd" * 32, 5).to_wire()]
PARSERS = {
    "message": (m.from_wire, [sample.to_wire() for sample in MESSAGES]
                + [m.Submit(name="x", blend_sha256=SHA, blend_size=3, settings={"chunk": 2}, files=MANIFEST,
                            main="shot.blend").to_wire()]),
    "job_request": (JobRequest.from_wire, [JobRequest(frame_start=1, frame_end=9, split=0, blender="5.3").to_wire()]),
    "scene_info": (SceneInfo.from_wire, [SCENE.to_wire()]),
    "assignment": (validate_assignment, [{"file_format": "PNG", "samples": 4, "percentage": 50, "device": "CPU",
                                          "split": SPLIT, "allow_missing": True}]),
    "tile_spec": (TileSpec.from_wire, [SPLIT]),
    "manifest": (lambda files: Manifest.from_wire(files, "shot.blend"), [MANIFEST]),
    "missing": (missing_from_wire, [[f.to_wire() for f in SCENE.missing]]),
}
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1 << 70, -(1 << 63), 0.5, math.nan, math.inf, -math.inf, 1e308,
                         "", "x" * 5000, "a\nb", "../..", "C:\\x", "\x00", b"", b"\xff" * 40, [], [None], {},
                         {"k": math.nan}, [[[]]], "PNG", "scene.blend", SHA, 2, 64]


def odd(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [odd(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and roll < 0.3:
        return {rng.choice(["t", "x", "frame", "relpath", "size", "sha256"]): odd(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return rng.choice(ODD_VALUES)


def mutate(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """The value with one thing broken somewhere inside: a field replaced, dropped or added, an item changed."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.8:
        copy = dict(value)
        key = rng.choice(sorted(copy))
        action = rng.random()
        if action < 0.2 and key != "t":
            del copy[key]
        elif action < 0.6:
            copy[key] = mutate(rng, copy[key], depth + 1)
        else:
            copy[key] = odd(rng)
        return copy
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.8:
        copy = list(value)
        index = rng.randrange(len(copy))
        copy[index] = mutate(rng, copy[index], depth + 1) if rng.random() < 0.6 else odd(rng)
        if rng.random() < 0.2:
            copy.extend(copy * rng.randrange(1, 40))
        return copy
    return odd(rng)


@pytest.mark.parametrize("name", list(PARSERS))
def test_malformed_input_is_refused_with_a_protocol_error_and_nothing_else(name: str) -> None:
    parse, valid = PARSERS[name]
    rng = random.Random(f"schema-{name}")
    for sample in valid:
        parse(sample)  # the samples themselves pass
    refused = 0
    for _ in range(3000):
        value = mutate(rng, rng.choice(valid))
        if rng.random() < 0.5:  # as it would arrive: through msgpack (a tuple becomes a list, keys stay text)
            try:
                value = decode_body(msgpack.packb({"v": value}, use_bin_type=True))["v"]
            except (ProtocolError, TypeError, ValueError, OverflowError):
                continue  # msgpack cannot carry it (a 70-bit int): no peer could send it
        try:
            parse(value)
        except ProtocolError as exc:
            refused += 1
            assert str(exc), "every refusal says why"
    assert refused > 1000, f"only {refused} of 3000 broken inputs were refused"
