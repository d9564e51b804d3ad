"""Small asyncio helpers shared by the layers."""
from __future__ import annotations

import asyncio


def retrieve_exception(fut: asyncio.Future) -> None:
    """A done callback for a future whose outcome may never be awaited (its
    caller was cancelled, its request failed): fetch its exception so that
    asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()
