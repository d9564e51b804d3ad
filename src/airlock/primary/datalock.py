"""Exclusive ownership of the primary data directory.

The gateway holds it while it runs; `airlock restore`, which rewrites the log,
the index and chunk files, holds it for its whole run.  An flock on
`DATA/LOCK`: released by the kernel when the process exits, however it exits
(kill -9 included), so a stale lock file never blocks anyone.

    lock = PrimaryLock(data_dir)     # PolicyError if another process holds it
    ...
    lock.release()
"""
from __future__ import annotations

import fcntl
import os

from airlock.errors import PolicyError

LOCK_FILE = "LOCK"


class PrimaryLock:
    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, LOCK_FILE)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise PolicyError(f"the primary data directory {os.path.abspath(data_dir)} is in use "
                              f"by a running gateway{pid} (stop it first)") from None
        # who holds it, for a human looking at the file; the flock is what counts
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "PrimaryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
