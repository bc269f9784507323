"""Random manifests, LATESTs and listings thrown at the parser: it accepts something safe or refuses
with a short `LoramError`, never anything else (hypothesis, a fixed number of examples per test,
derandomized, no deadline: the work is bounded, not timed)."""

from __future__ import annotations

import json
import posixpath
import re
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loram_core.bucket.untrusted import parse_latest, parse_listing, parse_manifest
from loram_core.errors import LoramError
from loram_core.manifest import MAX_FILE_BYTES, NAME_PATTERN, RESERVED, Manifest

SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# Components a hostile manifest would try, and ordinary ones.
COMPONENT = st.one_of(
    st.sampled_from(["model", "w.bin", "..", ".", "", "~", "a\\b", "x\x00y", "\x1b[0m", "caf\u00e9",
                     "cafe\u0301", "MODEL", "manifest.json", ".claim", "w.bin.part", "\u202e", "\ud800"]),
    st.text(max_size=12),
    st.text(alphabet="ab.", min_size=1, max_size=3),
    st.just("x" * 300),
)  # fmt: skip
PATH = st.one_of(
    st.lists(COMPONENT, min_size=0, max_size=5).map("/".join),
    st.sampled_from(["/etc/passwd", "a/" * 40 + "b", "a/" * 600]),
    st.text(max_size=30),
)
DIGEST = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=60, max_size=66),
    st.sampled_from(["/home/u/notes.txt", "../x", "0" * 63 + "\n"]),
    st.integers(),
    st.none(),
)
SIZE = st.one_of(
    st.integers(min_value=-3, max_value=10),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
)
NAME = st.one_of(st.sampled_from(["m", "v1", "..", "../x", "a/b", "", "-x", "x" * 129]), st.text(max_size=8))
ENTRY = st.fixed_dictionaries({"path": PATH, "size": SIZE, "sha256": DIGEST})
SAFE_PATHS = ["README.md", "model/config.json", "model/w.bin", "model/w.bin.part", "model/W.safetensors",
              "masks/masks.safetensors", "model-nf4/w.bin", "model/manifest.json", ".claim.txt"]  # fmt: skip
SAFE_ENTRY = st.fixed_dictionaries({
    "path": st.sampled_from(SAFE_PATHS),
    "size": st.integers(min_value=0, max_value=100),
    "sha256": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
})  # fmt: skip
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=10)  # fmt: skip


@st.composite
def manifests(draw) -> dict:
    """A valid manifest's frame with random files, and now and then one or two of its fields spoiled
    (so that the file checks are reached in most examples)."""
    doc = {
        "schema_version": 1, "name": "m", "version": "v1", "created_at": "2026-01-01T00:00:00+00:00",
        "files": draw(st.lists(SAFE_ENTRY, max_size=6, unique_by=lambda e: e["path"])), "code_version": "p",
        **{k: {} for k in ("base", "corpus", "prune", "align", "quantize", "params", "metrics")},
    }  # fmt: skip
    spoil = {
        "schema_version": st.sampled_from([2, "1", True, 1.0]), "name": NAME, "version": NAME,
        "created_at": st.sampled_from(["2026-01-01", "now", "", "2026-01-01T00:00:00"]),
        "base": JSON, "metrics": st.dictionaries(st.text(max_size=3), JSON, max_size=2), "code_version": JSON,
    }  # fmt: skip
    if draw(st.booleans()):  # a hostile entry among the files
        doc["files"].insert(draw(st.integers(0, len(doc["files"]))), draw(ENTRY))
    if draw(st.integers(0, 3)) == 0:
        for key in draw(st.lists(st.sampled_from(sorted(spoil)), min_size=1, max_size=2)):
            doc[key] = draw(spoil[key])
    if draw(st.integers(0, 9)) == 0:
        doc.pop(draw(st.sampled_from(sorted(doc))))  # a field missing
    return doc


def assert_safe(m: Manifest) -> None:
    """What an accepted manifest guarantees, checked here independently of the parser's code."""
    assert re.fullmatch(NAME_PATTERN, m.name) and re.fullmatch(NAME_PATTERN, m.version)
    keys = set()
    for f in m.files:
        assert type(f.size) is int and 0 <= f.size <= MAX_FILE_BYTES
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256)
        parts = f.path.split("/")
        assert all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)
        assert f.path.isprintable() and "\\" not in f.path and not f.path.startswith(("/", "~"))
        assert posixpath.normpath(posixpath.join("/dest", f.path)).startswith("/dest/")  # stays inside
        keys.add(unicodedata.normalize("NFC", f.path).casefold())
    assert len(keys) == len(m.files)  # no two entries for one file, on any disk
    folders = {"/".join(k.split("/")[:i]) for k in keys for i in range(1, k.count("/") + 1)}
    assert not keys & folders  # no file is also a folder
    assert not keys & {r.casefold() for r in RESERVED}


def assert_refusal(err: LoramError) -> None:
    message = str(err)
    assert message and "\n" not in message and len(message) < 1000


@SETTINGS
@given(doc=manifests(), ascii_only=st.booleans())
def test_a_random_manifest_is_accepted_safe_or_refused_as_a_loram_error(doc: dict, ascii_only: bool) -> None:
    try:
        data = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):  # a float JSON cannot write (inf): not something a bucket serves
        return
    try:
        m = parse_manifest(data, "s3://b/m/v1/manifest.json")
    except LoramError as err:
        assert_refusal(err)
    else:
        assert_safe(m)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_as_a_manifest_or_latest_are_refused_or_safe(data: bytes) -> None:
    try:
        assert_safe(parse_manifest(data, "w"))
    except LoramError as err:
        assert_refusal(err)
    try:
        version = parse_latest(data, "w")
    except LoramError as err:
        assert_refusal(err)
    else:
        assert re.fullmatch(NAME_PATTERN, version) and len(version) <= 128


@SETTINGS
@given(keys=st.lists(st.one_of(PATH, PATH.map(lambda p: p + "/")), max_size=8))
def test_a_random_listing_is_accepted_safe_or_refused(keys: list[str]) -> None:
    try:
        paths = parse_listing(keys, "s3://b/base", reserved=(".loram-source.json",))
    except LoramError as err:
        assert_refusal(err)
        return
    for p in paths:
        assert posixpath.normpath(posixpath.join("/dest", p)).startswith("/dest/") and p.isprintable()
    assert len({unicodedata.normalize("NFC", p).casefold() for p in paths}) == len(paths)
