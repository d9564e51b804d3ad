"""The commit point: the one place where a change becomes durable.

The engine hands every change (a commit record) to a CommitPoint and makes it
visible only after `commit` returns.  `LocalCommitPoint` makes a record durable
in the primary log (group fsync).  The replicated commit point (issue 3) wraps
the same log and additionally waits for the vault's durable ack over the link;
new chunks are handed to `ship_chunks` while the body is still arriving.

`after`: an awaitable of the durability of the chunks the record references
on the primary (a small body's row commit, still running when the commit is
called).  The record goes into the primary log only once it is done, and if
it fails the change never takes effect (the commit raises its error); the
replicated commit point sends the record to the vault meanwhile, so the two
disks work at once.

Ordering contract: `on_durable(records)` is called on the event loop, in
sequence-number order, for every batch of records that became durable, before
any `commit` call of that batch returns.  The engine applies records to its
index there, so visibility follows log order.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from airlock.log.writer import LogWriter


class CommitPoint(Protocol):
    last_seq: int

    async def commit(self, rtype: int, payload: bytes, after: Awaitable | None = None) -> int: ...

    async def ship_chunks(self, chunks: list[tuple[str, bytes]]) -> None: ...

    async def close(self) -> None: ...


class LocalCommitPoint:
    """Durable in the primary log only (the vault joins with the link)."""

    def __init__(self, log_dir: str, on_durable: Callable[[list], None]):
        self.log = LogWriter(log_dir, on_durable=on_durable)
        self.log.open()

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    async def commit(self, rtype: int, payload: bytes, after: Awaitable | None = None) -> int:
        if after is not None:
            await after                  # nothing to overlap it with: the log is the only commit
        return await self.log.append(rtype, payload)

    async def ship_chunks(self, chunks: list[tuple[str, bytes]]) -> None:
        pass

    async def close(self) -> None:
        await self.log.aclose()
