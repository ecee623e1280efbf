"""MemoryBudget: bytes of working memory that in-flight requests may hold at once.

A request reserves its estimate (a large image's decode, a large answer's working set) before the
work starts and waits, first come first served, while the budget is used by others; a reservation
larger than the whole budget can never be served and answers 413 at once. Waiting is cancellable:
a request whose client leaves stops waiting and holds nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

from .config import MB
from .errors import ApiError


class MemoryBudget:
    """An async byte semaphore (event-loop only)."""

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _wake(self) -> None:
        while self._waiters:
            size, fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.used + size > self.total:
                return
            self._waiters.popleft()
            self.used += size
            fut.set_result(None)

    async def acquire(self, nbytes: int, too_big: str) -> int:
        """Wait until `nbytes` fit, then hold them (release them with `release`); 413 with `too_big` (how
        to ask for less) when `nbytes` is over the whole budget. Returns the bytes held."""
        nbytes = max(0, int(nbytes))
        if nbytes > self.total:
            raise ApiError(413, f"{too_big} (this needs about {nbytes / MB:.0f} MB of working memory; the server's "
                                f"--memory-budget-mb is {self.total / MB:.0f})")
        if nbytes == 0:
            return 0
        if not self._waiters and self.used + nbytes <= self.total:
            self.used += nbytes
            return nbytes
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: give it back
                self.used -= nbytes
            self._wake()  # this waiter may have been first in line, blocking smaller ones behind it
            raise
        return nbytes

    def release(self, nbytes: int) -> None:
        if nbytes:
            self.used -= nbytes
            self._wake()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, too_big: str) -> AsyncIterator[None]:
        """Hold `nbytes` for the body of the with-block (see `acquire`)."""
        held = await self.acquire(nbytes, too_big)
        try:
            yield
        finally:
            self.release(held)
