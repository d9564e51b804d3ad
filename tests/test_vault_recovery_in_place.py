"""A vault store that failed a write recovers in place (VaultStore.reopen):
what was written after the last good sync is cut, what was acknowledged is
kept, and appends resume without a restart (docs/format/vault.md,
"Recovery in place").

The write failures are real: each scenario runs in its own process with
RLIMIT_FSIZE lowered (and SIGXFSZ ignored), so the kernel cuts a write short
at the limit and refuses the rest with EFBIG, as a full disk does with
ENOSPC.  The daemon-level path (a real full file system) is in
test_vault_disk_full.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")

PRELUDE = """
import asyncio, json, os, resource, signal, sys
import blake3
from airlock.log import payload as P
from airlock.vault.store import VaultStore

d = sys.argv[1]
st = VaultStore(d).open()

def rec(seq, bucket, key, data):
    h = blake3.blake3(data).hexdigest()
    m = {"bucket": bucket, "key": key, "size": len(data), "etag": f"e{seq}", "mtime": 1.0 + seq,
         "meta": {"headers": {}, "user": {}}, "chunks": [[h, len(data)]]}
    return h, (seq, P.OBJECT_PUT, P.encode_payload(m))

def send(*records):
    return asyncio.run(st.append(list(records)))

def limited(limit, fn):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        fn()
    except Exception as e:
        return repr(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return None

send((1, P.BUCKET_CREATE, P.encode_payload({"bucket": "b", "owner": "o", "created": 1.0})))
kept = os.urandom(300_000)
hk, r2 = rec(2, "b", "kept", kept)
st.put_chunk(hk, kept)
send(r2)
out = {}
"""


def run(tmp_path: Path, body: str) -> dict:
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "vault")], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=SRC))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_chunk_write_cut_short_is_removed_and_appends_resume_without_a_restart(tmp_path):
    out = run(tmp_path, """
        ov = st._overlays[-1]
        lost = os.urandom(200_000)
        hl, r3 = rec(3, "b", "lost", lost)
        out["error"] = limited(ov.size + 50_000, lambda: st.put_chunk(hl, lost))
        out["torn_bytes"] = os.path.getsize(ov.path) - ov.synced_size
        try:
            send(r3)
        except Exception as e:
            out["refused"] = repr(e)
        out["reopened"] = asyncio.run(st.reopen())
        out["cut_to_synced"] = os.path.getsize(ov.path) == ov.synced_size if os.path.exists(ov.path) else None
        out["last_seq"] = st.last_seq
        out["kept"] = st.read_chunk(hk) == kept
        st.put_chunk(hl, lost)
        out["acked"] = send(r3)
        out["lost_now_kept"] = st.read_chunk(hl) == lost and st.manifest("b", "lost")["size"] == len(lost)
        st.close_sync()
        again = VaultStore(d).open()
        out["torn_at_next_open"] = again.recovery["torn_overlays"]
        out["after_restart"] = (again.last_seq, again.read_chunk(hk) == kept, again.read_chunk(hl) == lost)
    """)
    assert "File too large" in out["error"]               # the kernel cut the write (EFBIG)
    assert out["torn_bytes"] > 0                           # a partial entry was left past the durable end
    assert "recovering" in out["refused"]                  # no append while failed
    assert out["reopened"] is True
    assert out["last_seq"] == 2 and out["kept"] is True    # what was acknowledged survives
    assert out["acked"] == 3 and out["lost_now_kept"] is True
    assert out["torn_at_next_open"] == []                  # the partial entry was cut, not left for later
    assert out["after_restart"] == [3, True, True]


def test_records_the_log_took_before_the_overlay_failed_are_kept_and_announced(tmp_path):
    """The vault log took a batch, the overlay then failed: the batch is
    durable, though never acknowledged.  While failed the store's last_seq
    lags its log, so HELLO announces the log's end instead, and recovery keeps
    exactly that: a reconnecting primary fetches the batch and voids it
    instead of reusing its sequence numbers."""
    out = run(tmp_path, """
        data = os.urandom(100_000)
        h, r3 = rec(3, "b", "k3", data)
        st.put_chunk(h, data)
        asyncio.run(asyncio.to_thread(st._sync_newest))
        ov = st._overlays[-1]
        def append():
            send(r3)
        # the log segment is far smaller than the overlay: only the overlay's RECORD entry hits the limit
        out["error"] = limited(ov.size + 40, append)
        out["failed_last_seq"] = st.last_seq
        out["log_last"] = st._log.last_seq
        out["announced"] = st.announced_last_seq
        out["served_while_failed"] = [r[0] for r in st.records(1, 10)]
        out["reopened"] = asyncio.run(st.reopen())
        out["last_seq"] = st.last_seq
        out["record"] = [list(r[:2]) for r in st.records(3, 10)]
        out["manifest"] = (st.manifest("b", "k3") or {}).get("size")
    """)
    assert out["error"] and "File too large" in out["error"]
    assert out["failed_last_seq"] == 2 and out["log_last"] == 3
    assert out["announced"] == 3 and out["served_while_failed"] == [1, 2, 3]     # what HELLO says
    assert out["reopened"] is True
    assert out["last_seq"] == 3                            # durable in the log: kept, replayed into the overlay
    assert out["record"] == [[3, 3]]                       # (seq, OBJECT_PUT)
    assert out["manifest"] == 100_000


def test_a_seal_that_fails_stops_the_store_and_recovery_opens_a_new_overlay(tmp_path):
    out = run(tmp_path, """
        ov = st._overlays[-1]
        st.overlay_max_bytes = 1                     # the next check seals
        out["error"] = limited(16, st.maybe_seal)    # the SEAL entry cannot be written
        out["failed"] = repr(st.failed)
        out["reopened"] = asyncio.run(st.reopen())
        st.overlay_max_bytes = 1 << 30
        data = os.urandom(1000)
        h, r3 = rec(3, "b", "after", data)
        st.put_chunk(h, data)
        out["acked"] = send(r3)
        out["kept"] = st.read_chunk(hk) == kept and st.read_chunk(h) == data
    """)
    assert "File too large" in out["error"] and "File too large" in out["failed"]
    assert out["reopened"] is True and out["acked"] == 3 and out["kept"] is True


def test_a_recovery_that_fails_keeps_serving_reads_and_succeeds_later(tmp_path):
    out = run(tmp_path, """
        lost = os.urandom(200_000)
        hl, _r3 = rec(3, "b", "lost", lost)
        out["error"] = limited(st._overlays[-1].size + 50_000, lambda: st.put_chunk(hl, lost))
        # something recovery cannot read (a disk fault): the attempt fails
        bad = os.path.join(d, "overlays", "ov-00000000000000000001.ovl")
        with open(bad, "wb") as f:
            f.write(b"garbage" * 10)
        out["first"] = asyncio.run(st.reopen())
        out["still_failed"] = st.failed is not None
        out["reads"] = st.read_chunk(hk) == kept and st.manifest("b", "kept")["size"] == len(kept)
        os.unlink(bad)
        out["second"] = asyncio.run(st.reopen())
        out["after"] = st.failed is None and st.read_chunk(hk) == kept
    """)
    assert out["first"] is False and out["still_failed"] is True
    assert out["reads"] is True                      # the old files still serve what was acknowledged
    assert out["second"] is True and out["after"] is True
