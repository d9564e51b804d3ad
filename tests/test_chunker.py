"""Content-defined chunker: both implementations, agreement, streaming, known answers."""
from __future__ import annotations

import importlib
import json
import os

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.chunk import _chunker_py

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    _chunker = importlib.import_module("airlock.chunk._chunker")
except ImportError:  # test_accelerated.py fails loudly about this
    _chunker = None

IMPLS = [pytest.param(_chunker_py, id="python"),
         pytest.param(_chunker, id="cython",
                      marks=pytest.mark.skipif(_chunker is None, reason="compiled chunker not built"))]

SMALL = (64, 256, 1024)   # tiny parameters keep the pure-Python twin fast


def xof(seed: str, n: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=n)


def lengths(bounds: list[int]) -> list[int]:
    return [b - a for a, b in zip([0] + bounds, bounds)]


# ---------------------------------------------------------------- API and parameters
@pytest.mark.parametrize("impl", IMPLS)
def test_defaults_are_256k_1m_4m(impl):
    assert (impl.MIN_SIZE, impl.AVG_SIZE, impl.MAX_SIZE) == (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("params", [
    (256, 256, 1024), (300, 256, 1024), (64, 300, 1024), (64, 256, 256), (0, 256, 1024),
    (16, 32, 1024), (64, 256, 2 ** 31 + 1), (64.0, 256, 1024), (True, 256, 1024),
])
def test_invalid_parameters_raise_value_error(impl, params):
    with pytest.raises(ValueError):
        impl.chunk_boundaries(b"x" * 10, *params)
    with pytest.raises(ValueError):
        impl.cut_point(b"x" * 10, *params)
    with pytest.raises(ValueError):
        impl.StreamChunker(*params)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input_has_no_chunks(impl):
    assert impl.chunk_boundaries(b"", *SMALL) == []
    assert impl.chunk_and_digest(b"", *SMALL) == []
    sc = impl.StreamChunker(*SMALL)
    assert sc.update(b"") == []
    assert sc.finish() == []


@pytest.mark.parametrize("impl", IMPLS)
def test_cut_point_needs_more_data_below_max(impl):
    assert impl.cut_point(b"", *SMALL) == -1
    assert impl.cut_point(b"\0" * 63, *SMALL) == -1
    assert impl.cut_point(b"\0" * 1023, *SMALL) == -1   # zeros never match a mask


@pytest.mark.parametrize("impl", IMPLS)
def test_cut_point_forces_cut_at_max(impl):
    assert impl.cut_point(b"\0" * 1024, *SMALL) == 1024
    assert impl.cut_point(b"\0" * 5000, *SMALL) == 1024


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_sizes_respect_min_and_max(impl):
    data = xof("sizes", 200_000)
    sizes = lengths(impl.chunk_boundaries(data, *SMALL))
    assert sum(sizes) == len(data)
    assert all(64 < s <= 1024 for s in sizes[:-1])
    assert 1 <= sizes[-1] <= 1024


def test_compiled_chunker_is_not_pathological_at_default_sizes():
    impl = _chunker or _chunker_py
    data = xof("defaults", 32 * 1024 * 1024 if _chunker else 4 * 1024 * 1024)
    sizes = lengths(impl.chunk_boundaries(data))
    assert all(256 * 1024 < s <= 4 * 1024 * 1024 for s in sizes[:-1])
    if _chunker:
        mean = len(data) / len(sizes)
        assert 700 * 1024 < mean < 1700 * 1024


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(impl, kind):
    data = xof("buffers", 5000)
    expected = impl.chunk_boundaries(data, *SMALL)
    assert impl.chunk_boundaries(kind(data), *SMALL) == expected
    assert impl.cut_point(kind(data), *SMALL) == expected[0]
    assert [o + n for o, n, _ in impl.chunk_and_digest(kind(data), *SMALL)] == expected
    sc = impl.StreamChunker(*SMALL)
    got = sc.update(kind(data)) + sc.finish()
    assert b"".join(c for _, c in got) == data


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_and_digest_uses_blake3_of_each_chunk(impl):
    data = xof("digest", 20_000)
    out = impl.chunk_and_digest(data, *SMALL)
    assert [o + n for o, n, _ in out] == impl.chunk_boundaries(data, *SMALL)
    for off, n, d in out:
        assert d == blake3.blake3(data[off:off + n]).digest()


def test_gear_tables_agree_and_match_the_spec():
    assert _chunker_py.gear_table()[0] == 0x6b6f6e559b08e5ca
    assert _chunker_py.gear_table()[255] == 0x60f3954eddd2d5da
    if _chunker:
        assert _chunker.gear_table() == _chunker_py.gear_table()


def test_cut_point_is_stateless():
    # cut_point is stateless: same input, same answer, any call order.
    impl = _chunker or _chunker_py
    a, b = xof("a", 3000), xof("b", 3000)
    first = impl.cut_point(a, *SMALL)
    impl.cut_point(b, *SMALL)
    assert impl.cut_point(a, *SMALL) == first


# ---------------------------------------------------------------- streaming
@pytest.mark.parametrize("impl", IMPLS)
def test_stream_chunker_buffer_is_bounded(impl):
    sc = impl.StreamChunker(*SMALL)
    for i in range(200):
        piece = bytes(700) if i % 3 else xof(str(i), 700)
        sc.update(piece)
        assert sc.buffered < 1024
    sc.finish()


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_chunker_keeps_no_reference_to_callers_buffer(impl):
    # The compiled update scans the caller's buffer in place; the unfinished tail
    # must still be copied, so reusing the caller's buffer cannot change the chunks.
    data = xof("reuse", 5000)
    whole = impl.chunk_and_digest(data, *SMALL)
    sc = impl.StreamChunker(*SMALL)
    piece = bytearray(700)
    got = []
    for i in range(0, len(data), 700):
        n = min(700, len(data) - i)
        piece[:n] = data[i:i + n]
        got += sc.update(memoryview(piece)[:n])
        piece[:] = bytes(700)
    got += sc.finish()
    assert [(d, data[o:o + n]) for o, n, d in whole] == got


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_piece_spanning_several_chunks_after_a_held_prefix(impl):
    data = xof("span", 20_000)
    whole = impl.chunk_and_digest(data, *SMALL)
    sc = impl.StreamChunker(*SMALL)
    got = sc.update(data[:10]) + sc.update(data[10:]) + sc.finish()
    assert len(whole) > 10
    assert [(d, data[o:o + n]) for o, n, d in whole] == got


@pytest.mark.parametrize("impl", IMPLS)
def test_update_after_finish_is_refused(impl):
    sc = impl.StreamChunker(*SMALL)
    sc.update(b"abc")
    assert len(sc.finish()) == 1
    with pytest.raises(ValueError):
        sc.update(b"more")


@st.composite
def stream_case(draw):
    data = draw(st.one_of(
        st.binary(max_size=6000),
        st.builds(xof, st.text(max_size=8), st.integers(0, 12000)),
    ))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return data, cuts


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=stream_case())
def test_stream_in_any_split_equals_whole_buffer(impl, case):
    data, cuts = case
    sc = impl.StreamChunker(*SMALL)
    got = []
    prev = 0
    for c in cuts + [len(data)]:
        got += sc.update(data[prev:c])
        prev = c
    got += sc.finish()
    whole = impl.chunk_and_digest(data, *SMALL)
    assert [(d, data[o:o + n]) for o, n, d in whole] == got


# ---------------------------------------------------------------- twins agree
@st.composite
def params(draw):
    avg_bits = draw(st.integers(6, 10))
    avg = 1 << avg_bits
    mn = draw(st.integers(1, avg - 1))
    mx = draw(st.integers(avg + 1, 4 * avg))
    return mn, avg, mx


@pytest.mark.skipif(_chunker is None, reason="compiled chunker not built")
@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=5000), st.builds(xof, st.text(max_size=8), st.integers(0, 20000))),
       p=params())
def test_twins_agree_on_arbitrary_input_and_parameters(data, p):
    assert _chunker.chunk_boundaries(data, *p) == _chunker_py.chunk_boundaries(data, *p)
    assert _chunker.cut_point(data, *p) == _chunker_py.cut_point(data, *p)


# ---------------------------------------------------------------- known answers
with open(os.path.join(HERE, "known_answers", "chunker.json")) as _f:
    KNOWN = json.load(_f)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", KNOWN["cases"], ids=[c["name"] for c in KNOWN["cases"]])
def test_known_answers_are_reproduced(impl, case):
    data = bytes(case["length"]) if case["seed"] is None else xof(case["seed"], case["length"])
    out = impl.chunk_and_digest(data, case["min_size"], case["avg_size"], case["max_size"])
    assert [o + n for o, n, _ in out] == case["boundaries"]
    assert [d.hex() for _, _, d in out] == case["digests"]


@pytest.mark.parametrize("impl", IMPLS)
def test_known_gear_values(impl):
    g = impl.gear_table()
    assert [hex(g[0]), hex(g[1]), hex(g[255])] == KNOWN["gear_first_last"]
    assert hex(impl.GEAR_SEED) == KNOWN["gear_seed"]


# ---------------------------------------------------------------- dispatcher
def test_dispatcher_reexports_the_api():
    from airlock.chunk import chunker
    assert chunker.IMPLEMENTATION in ("cython", "python")
    for name in ("MIN_SIZE", "AVG_SIZE", "MAX_SIZE", "cut_point", "chunk_boundaries",
                 "chunk_and_digest", "StreamChunker"):
        assert hasattr(chunker, name)
