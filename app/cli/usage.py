"""`spafit usage`: what the tenant stores on a service, against its quota."""

from __future__ import annotations

from typing import Any

from .common import emit, main, remote, table


@main.command()
@remote
def usage(client: Any, as_json: bool) -> None:
    """Bytes this tenant stores on the service (datasets, adapter versions, batch results) and its quota
    (SPAFIT_TENANT_MAX_STORED_BYTES); past it, uploads and new jobs are refused until something is deleted."""
    u = client.usage()
    limit = "no limit" if u.limit_bytes is None else str(u.limit_bytes)
    rows = [[kind, str(n)] for kind, n in u.by_kind.model_dump().items()]
    rows += [["total", str(u.stored_bytes)], ["quota", limit]]
    if u.available_bytes is not None:
        rows.append(["available", str(u.available_bytes)])
    emit(u.model_dump(mode="json"), as_json, table(["stored", "bytes"], rows))
