"""Regenerate the frozen known-answer vectors in this directory.

    PYTHONPATH=src python tests/known_answers/generate.py

Only run this together with a deliberate, versioned format change
(docs/format/chunking.md, docs/format/log.md): the point of the vectors is that
they do NOT change.  Uses the pure-Python twins and checks the compiled
modules agree when they are importable.
"""
from __future__ import annotations

import json
import os
import sys

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, seed string, input length in bytes, (min, avg, max))
CHUNKER_CASES = [
    ("default-8MiB", "airlock known answer 1", 8 * 1024 * 1024, (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)),
    ("small-1MiB", "airlock known answer 2", 1024 * 1024, (4096, 16384, 65536)),
    ("tiny-64KiB", "airlock known answer 3", 64 * 1024, (64, 256, 1024)),
    ("tiny-short-input", "airlock known answer 4", 700, (64, 256, 1024)),
    ("zeros-forced-cuts", None, 10000, (64, 256, 1024)),
]

# (seq, rtype, flags, payload)
RECORD_CASES = [
    (1, 1, 0, b"hello"),
    (2, 2, 0, b"world!"),
    (3, 0, 0, b""),
    (2 ** 64 - 1, 255, 0xFFFF, bytes(range(256))),
]


def pseudo_random(seed: str | None, n: int) -> bytes:
    """Deterministic input: BLAKE3 XOF of the seed string (zeros if seed is None)."""
    if seed is None:
        return bytes(n)
    return blake3.blake3(seed.encode()).digest(length=n)


def chunker_vectors(impl) -> dict:
    cases = []
    for name, seed, length, (mn, avg, mx) in CHUNKER_CASES:
        data = pseudo_random(seed, length)
        chunks = impl.chunk_and_digest(data, mn, avg, mx)
        cases.append({
            "name": name, "seed": seed, "length": length,
            "min_size": mn, "avg_size": avg, "max_size": mx,
            "boundaries": [off + ln for off, ln, _ in chunks],
            "digests": [d.hex() for _, _, d in chunks],
        })
    gear = impl.gear_table()
    return {
        "comment": "Frozen. See tests/known_answers/generate.py and docs/format/chunking.md.",
        "gear_seed": hex(impl.GEAR_SEED),
        "gear_first_last": [hex(gear[0]), hex(gear[1]), hex(gear[255])],
        "cases": cases,
    }


def record_vectors(impl, segment_header) -> dict:
    return {
        "comment": "Frozen. See tests/known_answers/generate.py and docs/format/log.md.",
        "segment_header_first_seq_1": segment_header(1).hex(),
        "records": [
            {"seq": s, "rtype": t, "flags": f, "payload": p.hex(), "encoded": impl.encode_record(s, t, p, f).hex()}
            for s, t, f, p in RECORD_CASES
        ],
    }


def main() -> int:
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from airlock.chunk import _chunker_py
    from airlock.log import _record_py
    from airlock.log.record import encode_segment_header

    chunks = chunker_vectors(_chunker_py)
    records = record_vectors(_record_py, encode_segment_header)
    try:
        from airlock.chunk import _chunker
        from airlock.log import _record
    except ImportError:
        print("compiled modules not built; vectors from the twins only", file=sys.stderr)
    else:
        assert chunker_vectors(_chunker) == chunks, "compiled chunker disagrees with the twin"
        assert record_vectors(_record, encode_segment_header) == records, "compiled codec disagrees"
    for name, obj in (("chunker.json", chunks), ("record.json", records)):
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        print("wrote", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
