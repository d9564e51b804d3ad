"""The index generation page a gateway's leader shares with its workers
(docs/format/ipc.md): counters the leader bumps, read by the workers; a
worker refuses a descriptor that is not such a page."""
from __future__ import annotations

import os

import pytest

from airlock.primary.generation import MAGIC, SIZE, Generation, GenerationError


def test_a_worker_sees_every_bump_the_leader_makes():
    leader = Generation.create()
    worker = Generation.attach(os.dup(leader.fd))
    assert worker.read() == (0, 0)
    leader.bump(buckets=False)
    assert worker.read() == (1, 0)
    leader.bump(buckets=True)
    assert worker.read() == (2, 1)
    worker.close()
    leader.close()


def test_the_page_starts_with_its_magic_and_version():
    leader = Generation.create()
    with open(f"/proc/self/fd/{leader.fd}", "rb") as f:
        raw = f.read()
    assert len(raw) == SIZE and raw[:4] == MAGIC and raw[4:8] == (1).to_bytes(4, "little")
    leader.close()


def test_a_worker_cannot_write_the_page():
    leader = Generation.create()
    worker = Generation.attach(os.dup(leader.fd))
    with pytest.raises(TypeError):
        worker.bump(buckets=True)
    assert leader.read() == (0, 0)
    worker.close()
    leader.close()


@pytest.mark.parametrize("content", [b"", b"x" * SIZE, b"ALIG" + (2).to_bytes(4, "little") + bytes(SIZE - 8),
                                     MAGIC + (1).to_bytes(4, "little") + bytes(SIZE)])
def test_a_worker_refuses_a_descriptor_that_is_not_a_generation_page(tmp_path, content):
    path = tmp_path / "not-a-page"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(GenerationError):
            Generation.attach(fd)
    finally:
        os.close(fd)
