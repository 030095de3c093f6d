"""Cursor iteration over the service's listings: iterate a pager and it fetches page after page.

    for job in client.jobs.list(status="running"):          # every running job, across pages
    async for job in aclient.jobs.list(status="running"):   # the same, async
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from .models import Page

T = TypeVar("T")


class SyncPager(Generic[T]):
    """Lazily fetches pages (`limit` items each) as iteration needs them."""

    def __init__(self, fetch: Callable[[str | None], Page[T]], cursor: str | None = None):
        self._fetch, self._cursor = fetch, cursor

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items

    def pages(self) -> Iterator[Page[T]]:
        cursor = self._cursor
        while True:
            page = self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def first_page(self) -> Page[T]:
        return self._fetch(self._cursor)


class AsyncPager(Generic[T]):
    """The async twin of `SyncPager`: `async for item in pager`."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[Page[T]]], cursor: str | None = None):
        self._fetch, self._cursor = fetch, cursor

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page.items:
                yield item

    async def pages(self) -> AsyncIterator[Page[T]]:
        cursor = self._cursor
        while True:
            page = await self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def first_page(self) -> Page[T]:
        return await self._fetch(self._cursor)

    async def to_list(self) -> list[T]:
        return [item async for item in self]
