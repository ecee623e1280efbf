"""API keys: which keys a server accepts, and the cache namespace each one opens.

Every key is its own namespace: embeddings, ids and logits made with one key are invisible to every
other key. Without keys the server is open and all clients share the single namespace "public".
Keys are compared in constant time against every configured key (no early exit that would tell how
many characters matched), and any string a client sends is safe to compare, lone surrogates included.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ..errors import Sam2rtError

PUBLIC = "public"
UNAUTHORIZED_HELP = ("missing or wrong API key: pass it as ?api_key=KEY, an `Authorization: Bearer KEY` header, "
                     "or the body's api_key field")


def _digest(key: str) -> bytes:
    # surrogatepass: a JSON body may carry "\ud800", which plain UTF-8 cannot encode
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The accepted API keys; `namespace(key)` is the namespace a presented key opens, or None."""

    def __init__(self, keys: tuple[str, ...] | list[str] = ()) -> None:
        cleaned = [k for k in keys if k]
        if len(set(cleaned)) != len(cleaned):
            raise Sam2rtError("the same API key is given twice; give each key once")
        self._digests = [_digest(k) for k in cleaned]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def namespace(self, presented: str | None) -> str | None:
        """The namespace of a valid key ("key<N>", N its position), PUBLIC when no key is required,
        None for a missing or wrong key."""
        if not self._digests:
            return PUBLIC
        if not isinstance(presented, str) or not presented:
            return None
        got = _digest(presented)
        found = None
        for i, d in enumerate(self._digests):  # compare with every key: time does not depend on which matched
            if hmac.compare_digest(got, d):
                found = i
        return None if found is None else f"key{found}"


def read_key_file(path: Path) -> list[str]:
    """Keys from a file: one per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise Sam2rtError(f"--api-key-file {path}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise Sam2rtError(f"--api-key-file {path} holds no keys (one per line; # starts a comment)")
    return keys
