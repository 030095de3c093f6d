"""API key format, hashing, the authenticated `Principal`, and what counts as a loopback address. Pure
functions: no database, no FastAPI.

A key reads `spafit_<prefix>_<secret>`: the prefix (public, 12 hex chars) finds the row, the secret
(256 random bits) is checked against its stored hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import uuid
from dataclasses import dataclass

from .settings import SCOPES

KEY_SCHEME = "spafit"
PREFIX_BYTES = 6  # 12 hex chars: collisions are checked by the unique index, lookups stay cheap
SECRET_BYTES = 32  # 256 bits


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, the key used (None when auth is off) and what the key may do."""

    tenant_id: uuid.UUID
    key_id: uuid.UUID | None
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def new_key() -> tuple[str, str, str]:
    """(prefix, secret, plaintext). The plaintext is shown to the user once and never stored."""
    prefix = secrets.token_hex(PREFIX_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return prefix, secret, f"{KEY_SCHEME}_{prefix}_{secret}"


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None. The secret may itself contain '_'."""
    parts = plaintext.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def hash_secret(secret: str) -> str:
    # A single sha256 is enough here, unlike for passwords: the secret is 256 random bits from `secrets`, so
    # there is no dictionary to try and brute force over 2^256 is hopeless however fast the hash. Slow KDFs
    # (bcrypt, argon2) exist to stretch low-entropy passwords and would add tens of ms to every request.
    return hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def check_scopes(scopes: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """The scopes, deduplicated in canonical order; ValueError on an unknown one or none at all."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; allowed: {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in scopes]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine: `localhost` or a loopback address (127.0.0.0/8,
    ::1). `0.0.0.0`, `::`, a LAN address or any other name is not."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack socket reports IPv4
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
