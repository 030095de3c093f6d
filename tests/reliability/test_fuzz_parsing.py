"""Property tests for dataset parsing, the gaps left by tests/core/test_data.py (which covers random bytes, random
text in six encodings, and CSV / TSV / JSONL round trips with default quoting): huge fields around the csv
module's field limit and the 8 MiB line limit, every quoting style and line ending, quotes dropped into valid
files at random, and the same inputs through POST /v1/datasets, where nothing may be a 5xx."""

from __future__ import annotations

import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spafit_core.data import MAX_LINE_BYTES, read_table
from spafit_core.errors import DataError
from tests.api.helpers import upload

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
LIMIT = csv.field_size_limit()
CELL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
QUOTING = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])
TERMINATOR = st.sampled_from(["\n", "\r\n"])


def _csv(rows: list[list[str]], quoting: int, terminator: str) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, quoting=quoting, lineterminator=terminator)
    writer.writerows(rows)
    return out.getvalue().encode()


@FAST
@given(st.lists(st.lists(CELL, min_size=2, max_size=2), min_size=1, max_size=5), QUOTING, TERMINATOR)
def test_every_quoting_style_and_line_ending_round_trips(rows, quoting, terminator):
    if quoting == csv.QUOTE_MINIMAL and terminator == "\n":
        # csv.writer leaves a lone \r unquoted unless it is part of the line terminator: that file is malformed
        # (a bare CR), which test_quotes_dropped_anywhere covers; here only well-formed files.
        rows = [[c.replace("\r", " ") for c in r] for r in rows]
    data = _csv([["text", "label"], *rows], quoting, terminator)
    table = read_table(data, "csv")
    assert table.records == [{"text": a, "label": b} for a, b in rows]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.integers(min_value=LIMIT - 3, max_value=LIMIT + 3), st.booleans(), st.sampled_from(["x", "é", '"']))
def test_fields_at_the_csv_field_limit_parse_exactly_or_fail_naming_the_limit(size, quoted, char):
    value = char * size
    data = _csv([["text", "label"], [value, "pos"]], csv.QUOTE_ALL if quoted else csv.QUOTE_MINIMAL, "\n")
    if size > LIMIT:
        try:
            read_table(data, "csv")
        except DataError as e:
            assert f"line 2: a field is longer than {LIMIT} characters" in e.message, e.message
        else:
            raise AssertionError(f"a {size}-character field passed the {LIMIT} limit")
    else:
        assert read_table(data, "csv").records == [{"text": value, "label": "pos"}]


def test_a_line_over_the_line_limit_is_a_data_error_not_a_hang():
    data = b"text,label\n" + b"x" * (MAX_LINE_BYTES + 1) + b",pos\n"
    for fmt in ("csv", "tsv", "jsonl"):
        try:
            read_table(data, fmt)
        except DataError as e:
            assert "line" in e.message
        else:
            raise AssertionError(f"{fmt}: an over-long line was accepted")


@FAST
@given(st.lists(st.lists(CELL, min_size=2, max_size=2), min_size=1, max_size=4), st.data())
def test_quotes_dropped_anywhere_give_a_table_or_a_data_error_naming_a_line(rows, data):
    text = _csv([["text", "label"], *rows], csv.QUOTE_MINIMAL, "\n").decode()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.sampled_from(['"', '""', '"\n', '\r'])) + text[i:]
    try:
        read_table(text.encode(), data.draw(st.sampled_from([None, "csv", "tsv"])))
    except DataError as e:
        assert e.message.startswith(("line ", "the file", "the header")) or "line" in e.message, e.message


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(lambda t: ("text,label\n" + t).encode("utf-8", "surrogatepass")),
    st.lists(st.lists(CELL, min_size=2, max_size=2), min_size=1, max_size=4).map(
        lambda rows: _csv([["text", "label"], *rows], csv.QUOTE_ALL, "\r\n")),
    st.lists(st.fixed_dictionaries({"text": CELL, "label": CELL}), min_size=1, max_size=4).map(
        lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
), st.sampled_from(["data.csv", "data.tsv", "data.jsonl", "data", "data.bin"]))
def test_any_upload_is_answered_201_or_a_4xx_problem(client, tenant_key, content, filename):
    headers = _headers(tenant_key)
    r = upload(client, content, filename, headers=headers)
    assert r.status_code == 201 or (400 <= r.status_code < 500), (r.status_code, r.text[:300])
    if r.status_code != 201:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "Traceback" not in r.text


_KEYS: dict[int, dict[str, str]] = {}


def _headers(factory) -> dict[str, str]:
    """One train key per test run (hypothesis calls the test many times with the same fixtures)."""
    if id(factory) not in _KEYS:
        _KEYS[id(factory)] = factory("train").headers
    return _KEYS[id(factory)]


def test_nul_characters_are_a_422_wherever_they_come_from(client, tenant_key):
    """Postgres stores no NUL in text or JSON. Found by the fuzz: a label with a NUL byte, or `?task=%00`, was
    a 500. Now a NUL byte in a file is a 422 naming its line, and any other NUL value is a 422 too."""
    key = tenant_key("train", "predict")
    cases = [
        upload(client, b"text,label\nhi,p\x00s\nyo,neg\n", "a.csv", headers=key.headers),
        upload(client, b"te\x00xt,label\nhi,pos\nyo,neg\n", "a.csv", headers=key.headers),
        upload(client, b'{"text": "hi", "label": "p\\u0000s"}\n{"text": "yo", "label": "neg"}\n', "a.jsonl",
               headers=key.headers),
        upload(client, b"text,label\nhi,pos\nyo,neg\n", "a.csv", headers=key.headers, name="a\x00b"),
        client.get("/v1/jobs", params={"task": "\x00"}, headers=key.headers),
    ]
    for r in cases:
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json") and "Traceback" not in r.text
    assert "line 2: a NUL byte" in cases[0].json()["detail"]
    assert client.get("/v1/datasets", headers=key.headers).json()["items"] == []
