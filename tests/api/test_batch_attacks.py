"""Adversarial requests to batch predictions and evaluations (issue 16) that once got a 500 or a wrong answer:
each is a 4xx problem+json naming the field, or the documented behaviour."""

from __future__ import annotations

import pytest

from .adapters import SPAFIT, random_adapter, register
from .helpers import assert_problem


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from .adapters import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("attack-model"))


@pytest.mark.parametrize("spec", ["\u00b2,1", "1,\u2460", "\u0661,2", "1,\uff12"])
def test_compare_with_non_ascii_digits_is_422_naming_compare(client, tenant_key, db, base, spec):
    """`str.isdigit` is true of superscripts and circled digits, which `int()` cannot parse: once a 500."""
    key = tenant_key("train")
    cfg, weights = random_adapter(base, SPAFIT, seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    r = client.get("/v1/tasks/sentiment/versions", params={"compare": spec}, headers=key.headers)
    assert assert_problem(r, 422)["field"] == "compare"
