"""Errors that cross the gateway's process channel (docs/format/ipc.md,
"Frame"): the caller must see the failure the callee saw, as far as the S3
answer depends on it."""
from __future__ import annotations

import asyncio
import errno
import socket

from airlock import errors as E
from airlock.primary.ipc import Peer
from airlock.s3.errors import to_s3_error


def call_raising(exc: BaseException) -> BaseException:
    """What a worker's call sees when the leader's handler raises `exc`."""
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        async def handler():
            raise exc
        leader, worker = Peer(a, {"boom": handler}), Peer(b, {})
        await leader.start()
        await worker.start()
        try:
            await worker.call("boom")
        except BaseException as got:       # noqa: BLE001
            return got
        finally:
            await worker.aclose()
            await leader.aclose()
        raise AssertionError("the call did not fail")
    return asyncio.run(main())


def test_a_full_disk_met_by_the_leader_is_a_503_storage_full_at_the_worker_too():
    got = call_raising(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(got, OSError) and got.errno == errno.ENOSPC
    err = to_s3_error(got)
    assert err.code == "ServiceUnavailable" and "storage is full" in err.message


def test_other_os_errors_keep_their_errno_and_stay_500s():
    got = call_raising(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert isinstance(got, OSError) and got.errno == errno.ENOENT
    assert to_s3_error(got).code == "InternalError"


def test_s3_errors_and_unknown_exceptions_cross_as_before():
    got = call_raising(E.PreconditionFailed())
    assert isinstance(got, E.PreconditionFailed) and to_s3_error(got).status == 412
    got = call_raising(ValueError("a bug"))
    assert isinstance(got, E.InternalError)
    got = call_raising(OSError("no errno"))
    assert isinstance(got, E.InternalError)
