"""The SDK's webhook verifier against the Standard Webhooks reference implementation (the `standardwebhooks`
package) and against what the service signs (app/services/webhooks.py), both ways."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime

import pytest
from spafit_client import WebhookVerificationError, sign_webhook, verify_webhook
from standardwebhooks import Webhook

from app.services import webhooks as server

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 32).decode()
BODY = json.dumps({"type": "job.succeeded", "data": {"job_id": "j1", "status": "succeeded"}}).encode()


def _headers(secret: str = SECRET, ts: int | None = None, msg_id: str = "msg_abc", body: bytes = BODY) -> dict:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign_webhook(secret, msg_id, ts, body)}


def test_the_reference_implementation_accepts_what_we_sign_and_we_accept_what_it_signs():
    ts = int(time.time())
    ours = server.headers([SECRET], "msg_1", ts, BODY)
    assert Webhook(SECRET).verify(BODY, ours) == json.loads(BODY)
    theirs = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(ts, UTC), BODY.decode())
    assert theirs == ours["webhook-signature"] == sign_webhook(SECRET, "msg_1", ts, BODY)
    assert verify_webhook(BODY, {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": theirs},
                          SECRET) == json.loads(BODY)


def test_a_tampered_body_id_or_timestamp_is_refused():
    headers = _headers()
    verify_webhook(BODY, headers, SECRET)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature"):
        verify_webhook(BODY.replace(b"succeeded", b"failed"), headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, {**headers, "webhook-id": "msg_other"}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, headers, OTHER)


def test_timestamps_outside_the_tolerance_are_refused_both_ways():
    now = 1_800_000_000
    headers = _headers(ts=now)
    assert verify_webhook(BODY, headers, SECRET, now=now + 300)  # exactly at the edge: accepted
    with pytest.raises(WebhookVerificationError, match="old"):
        verify_webhook(BODY, headers, SECRET, now=now + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify_webhook(BODY, headers, SECRET, now=now - 301)
    assert verify_webhook(BODY, headers, SECRET, now=now + 3000, tolerance_s=3600)
    for bad in ("", "12.5", "-5", "1e9", "abc", "9" * 20, "\u00b2", "1\u0663"):  # non-ASCII digits: isdigit() says yes, int() no
        with pytest.raises(WebhookVerificationError):
            verify_webhook(BODY, {**headers, "webhook-timestamp": bad}, SECRET, now=now)


def test_several_signatures_any_secret_and_unknown_versions():
    ts = int(time.time())
    rotated = server.headers([OTHER, SECRET], "msg_2", ts, BODY)  # the service during a rotation's overlap
    assert len(rotated["webhook-signature"].split(" ")) == 2
    assert verify_webhook(BODY, rotated, SECRET) and verify_webhook(BODY, rotated, OTHER)
    single = _headers(OTHER)
    assert verify_webhook(BODY, single, [SECRET, OTHER])  # a receiver moving to a new secret
    sig = single["webhook-signature"].split(",", 1)[1]
    junk = f"v2,{sig} v1,!!!notbase64 v1 nothing,at-all v1,{base64.b64encode(b'x' * 32).decode()}"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, {**single, "webhook-signature": junk}, OTHER)  # v2 is not v1, the rest do not match
    assert verify_webhook(BODY, {**single, "webhook-signature": junk + " v1," + sig}, OTHER)


def test_headers_any_case_body_str_or_bytes_and_what_is_missing_is_named():
    headers = {k.upper(): v for k, v in _headers().items()}
    assert verify_webhook(BODY.decode(), headers, SECRET) == verify_webhook(BODY, headers, SECRET)
    for missing in ("WEBHOOK-ID", "WEBHOOK-TIMESTAMP", "WEBHOOK-SIGNATURE"):
        with pytest.raises(WebhookVerificationError, match="missing"):
            verify_webhook(BODY, {k: v for k, v in headers.items() if k != missing}, SECRET)
    with pytest.raises(ValueError, match="whsec_"):
        verify_webhook(BODY, headers, "whsec_not base64!")
    not_json = b"plain text"
    with pytest.raises(WebhookVerificationError, match="JSON"):
        verify_webhook(not_json, _headers(body=not_json), SECRET)
    assert isinstance(WebhookVerificationError("x"), ValueError)  # `except ValueError` catches it too


@pytest.mark.parametrize("empty", ["", "whsec_", b"", ["", SECRET]])
def test_an_empty_secret_is_refused_not_trusted(empty):
    """An empty key signs as well as any: `verify_webhook(body, headers, "")` (a receiver whose secret variable is
    unset) accepted a message anyone had signed with the empty key. The reference implementation refuses an empty
    secret; so does the SDK now, signing or verifying."""
    import hashlib
    import hmac

    ts = int(time.time())
    forged = "v1," + base64.b64encode(hmac.new(b"", f"msg_x.{ts}.".encode() + BODY, hashlib.sha256).digest()).decode()
    headers = {"webhook-id": "msg_x", "webhook-timestamp": str(ts), "webhook-signature": forged}
    with pytest.raises(ValueError, match="secret is empty"):
        verify_webhook(BODY, headers, empty)
    with pytest.raises(ValueError, match="secret is empty"):
        sign_webhook(empty if not isinstance(empty, list) else "", "msg_x", ts, BODY)
