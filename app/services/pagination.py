"""Cursor pagination over `(created_at, id)`, newest first. The cursor is opaque to clients (base64 JSON)
and stable under inserts: a page never repeats or skips rows that existed when the listing began."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from ..errors import InvalidInput

MAX_LIMIT = 200
DEFAULT_LIMIT = 50


def encode_cursor(created_at: datetime, id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, id = json.loads(raw)
        if not isinstance(ts, str) or not isinstance(id, str):  # e.g. a forged cursor with a number as its id
            raise ValueError("cursor parts must be strings")
        created_at = datetime.fromisoformat(ts)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, uuid.UUID(id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidInput("invalid cursor; pass the next_cursor of a previous page", field="cursor") from None


def paginate(session: Session, stmt: Select, model: Any, *, limit: int, cursor: str | None) -> tuple[list, str | None]:
    """One page of `stmt` (a select of `model`, already filtered by tenant) and the cursor of the next."""
    if cursor:
        created_at, id = decode_cursor(cursor)
        stmt = stmt.where(tuple_(model.created_at, model.id) < tuple_(created_at, id))
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)
