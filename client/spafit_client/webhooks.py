"""Verify the webhooks the SPAFIT service sends (the Standard Webhooks scheme), in your receiver:

    from spafit_client import verify_webhook, WebhookVerificationError

    try:
        event = verify_webhook(request_body_bytes, request.headers, secret="whsec_...")
    except WebhookVerificationError:
        return 400                                       # not from the service, altered, or replayed
    if event["type"] == "job.succeeded": ...             # event["data"]: job_id, task, status, metrics, ...

The secret is the tenant's (`GET /v1/webhooks/secret`, admin). The signed content is
`{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256, base64; `webhook-signature` holds one or more
space-separated `v1,<signature>` (two after a secret rotation). Pass the body exactly as received (bytes):
re-serialized JSON does not verify. Deliveries are at least once: drop duplicates by `webhook-id`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import WebhookVerificationError

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # the Standard Webhooks default: 5 minutes either way


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        key = secret
    else:
        try:
            key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a webhook secret is `whsec_` followed by base64") from None
    if not key:  # anyone can sign with an empty key: a receiver whose secret variable is unset would trust them all
        raise ValueError("the webhook secret is empty: pass your tenant's `whsec_...` secret")
    return key


def sign_webhook(secret: str | bytes, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `v1,<base64>` signature of one message (what the service sends; handy in tests)."""
    data = body.encode() if isinstance(body, str) else body
    digest = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + data, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str | bytes | Iterable[str | bytes], *,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> Any:
    """The parsed JSON body if `headers` carry a valid signature of it by `secret` (or by any of several
    secrets, e.g. while you move to a rotated one) and a timestamp within `tolerance_s` of `now` (default:
    the clock); else `WebhookVerificationError`. Signatures are compared in constant time."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise WebhookVerificationError("webhook-timestamp is not a Unix time in seconds")
    timestamp = int(stamp)
    now = time.time() if now is None else now
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s:g} s old (a replay?)")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s:g} s in the future")
    data = body.encode() if isinstance(body, str) else bytes(body)
    keys = [secret] if isinstance(secret, str | bytes) else list(secret)
    expected = [base64.b64decode(sign_webhook(k, msg_id, timestamp, data)[3:]) for k in keys]
    matched = False
    for part in signatures.split():
        version, _, encoded = part.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        for e in expected:  # every comparison runs: no early exit that times which secret matched
            matched |= hmac.compare_digest(e, given)
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches the body with this secret")
    try:
        return json.loads(data)
    except ValueError:
        raise WebhookVerificationError("the signed body is not JSON") from None
