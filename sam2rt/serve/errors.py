"""ApiError: an HTTP error answered as `{"message": ...}` (the shape the inference-sdk client reads)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the server answers with `status` and a JSON body `{"message": message[, "detail": detail]}`."""

    def __init__(self, status: int, message: str, *, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out
