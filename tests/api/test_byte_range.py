"""`Range` headers on a result download (`app/services/batch.byte_range`): the one range RFC 9110 lets a server
answer, what it may ignore (the whole file), and what it must refuse (416)."""

from __future__ import annotations

import pytest

from app.errors import RangeNotSatisfiable
from app.services.batch import byte_range


@pytest.mark.parametrize(("header", "span"), [
    ("bytes=0-0", (0, 1)), ("bytes=-3", (7, 10)), ("bytes=3-", (3, 10)), ("bytes=9-", (9, 10)),
    ("bytes=2-400", (2, 10)), ("BYTES = 2-4", (2, 5)), ("bytes=-40", (0, 10)),
    (None, None), ("bytes=4-2", None), ("bytes=-", None), ("bytes=1-2,3-4", None), ("items=1-2", None),
    ("bytes=1", None), ("bytes=a-3", None), ("bytes=\u00b2-", None), ("bytes=1-\u0663", None),
])
def test_one_range_is_answered_and_anything_else_is_the_whole_file(header, span):
    assert byte_range(header, 10) == span


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)])
def test_a_range_past_the_end_or_of_an_empty_file_is_416_with_the_size(header, size):
    with pytest.raises(RangeNotSatisfiable) as err:
        byte_range(header, size)
    assert err.value.status == 416 and err.value.headers == {"Content-Range": f"bytes */{size}"}
