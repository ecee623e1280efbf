"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn limits header size (h11_max_incomplete_event_size) and idle keep-alive time, but a client that
sends its headers one byte at a time holds its connection forever. Here each request's headers must be
complete within `header_timeout_s` of their first byte (or of the connection opening); otherwise the
connection is closed. Body deadlines are the application's (admission.py), since they depend on the key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_header_timeout(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol subclass closing connections whose request headers take over header_timeout_s."""

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None and self._awaiting_headers():
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()  # the first bytes of a next request on a kept-alive connection start its deadline
            super().data_received(data)
            if not self._awaiting_headers():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
