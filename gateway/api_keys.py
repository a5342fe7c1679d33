"""API keys: which callers may use the gateway. No transport here.

Keys are held only as SHA-256 digests, so neither memory dumps nor the keys file (which may hold
`sha256:<hex>` lines instead of keys) reveal them. A caller is named in logs, metrics and rate
limit buckets by a short id derived from the digest, never by the key itself.

Without any configured key the gateway is open: every caller is the one `anonymous` caller.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from specmesh.errors import InvalidRequestError
from specmesh.grpc_errors import UnauthenticatedError

HASH_PREFIX = "sha256:"
ENV_VAR = "SPECMESH_GATEWAY_API_KEYS"  # comma-separated keys (or sha256:<hex> entries)
MAX_KEY_LENGTH = 512  # longer credentials are refused before hashing
KEY_ID_HEX = 12  # hex digits of the digest used as a caller's id in logs and metrics


@dataclass(frozen=True)
class Caller:
    """Who sent a request: `key_id` is a short digest of the API key, or "anonymous"."""

    key_id: str
    digest: str = ""  # full SHA-256 hex of the key; the rate limit bucket's name

    @property
    def bucket(self) -> str:
        return self.digest or self.key_id


ANONYMOUS = Caller("anonymous")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(digest: str) -> str:
    return f"key-{digest[:KEY_ID_HEX]}"


def parse_key_entry(entry: str) -> str:
    """One configured key (raw, or `sha256:<64 hex>`) -> its digest."""
    entry = entry.strip()
    if entry.lower().startswith(HASH_PREFIX):
        digest = entry[len(HASH_PREFIX):].strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            # The entry is secret-ish: never echo it.
            raise ValueError("an api key entry starting with 'sha256:' must be followed by 64 hex digits")
        return digest
    if not entry:
        raise ValueError("empty api key entry")
    return key_digest(entry)


def read_keys_file(path: str | Path) -> list[str]:
    """Digests of the keys in path: one key or `sha256:<hex>` per line; blank lines and lines
    starting with # are ignored (a mounted Kubernetes Secret works as is)."""
    digests = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            digests.append(parse_key_entry(line))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
    return digests


class ApiKeys:
    """The configured keys, as digests. `authenticate` maps a credential to a Caller."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self._digests = frozenset(digests)

    @classmethod
    def load(cls, keys_file: str | None = None, entries: Iterable[str] = ()) -> "ApiKeys":
        digests = [parse_key_entry(e) for e in entries if e.strip()]
        if keys_file:
            digests += read_keys_file(keys_file)
        return cls(digests)

    @classmethod
    def from_env(cls, keys_file: str | None = None, environ: dict[str, str] | None = None) -> "ApiKeys":
        value = (os.environ if environ is None else environ).get(ENV_VAR, "")
        return cls.load(keys_file, value.split(","))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, credential: str | None) -> Caller:
        """credential: the raw key, or an `Authorization` value (`Bearer <key>`), or None.
        Raises UnauthenticatedError (whose message never contains the credential)."""
        if not self.enabled:
            return ANONYMOUS
        key = bearer_token(credential)
        if key is None:
            raise UnauthenticatedError(
                "missing API key: send it as 'Authorization: Bearer <key>' (HTTP header or gRPC metadata)")
        if len(key) > MAX_KEY_LENGTH:
            raise UnauthenticatedError("invalid API key")
        digest = key_digest(key)
        # A lookup by digest: its timing can only reveal digests, which say nothing of keys.
        if digest not in self._digests:
            raise UnauthenticatedError("invalid API key")
        return Caller(key_id_of(digest), digest)


def bearer_token(credential: str | None) -> str | None:
    """The key in `Bearer <key>` (scheme case-insensitive), or the value itself without a scheme."""
    if credential is None:
        return None
    if not isinstance(credential, str):
        raise InvalidRequestError("authorization must be text")
    value = credential.strip()
    scheme, _, rest = value.partition(" ")
    if rest and scheme.lower() == "bearer":
        value = rest.strip()
    return value or None
