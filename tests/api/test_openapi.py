"""The OpenAPI document lists every route, its security and its problem+json error responses."""

from __future__ import annotations

EXPECTED = {
    ("post", "/v1/datasets"): {"401", "403", "413", "415", "422", "429", "503"},
    ("get", "/v1/datasets"): {"401", "403", "422"},
    ("get", "/v1/datasets/{dataset_id}"): {"401", "403", "404", "422"},
    ("delete", "/v1/datasets/{dataset_id}"): {"401", "403", "404", "409", "422"},
    ("get", "/readyz"): {"503"},
    ("get", "/healthz"): set(),
    ("get", "/metrics"): {"401", "404"},
    ("get", "/v1/tasks"): {"401", "403", "422"},
    ("get", "/v1/tasks/{task}"): {"401", "403", "404", "422"},
    ("delete", "/v1/tasks/{task}"): {"401", "403", "404", "422"},
    ("get", "/v1/tasks/{task}/versions"): {"401", "403", "404", "409", "422"},
    ("post", "/v1/tasks/{task}/versions/{version}/evaluate"): {"401", "403", "404", "409", "422", "429"},
    ("post", "/v1/batch-predictions"): {"401", "403", "404", "409", "422", "429"},
    ("get", "/v1/batch-predictions"): {"401", "403", "422"},
    ("get", "/v1/batch-predictions/{job_id}"): {"401", "403", "404", "422"},
    ("get", "/v1/batch-predictions/{job_id}/results"): {"401", "403", "404", "409", "422"},
    ("post", "/v1/tasks/{task}/versions/{version}/activate"): {"401", "403", "404", "422"},
    ("get", "/v1/tasks/{task}/adapter"): {"401", "403", "404", "409", "422"},
    ("put", "/v1/tasks/{task}/adapter"): {"401", "403", "413", "415", "422"},
    ("post", "/v1/tasks/{task}/predict"): {"401", "403", "404", "409", "413", "422", "503", "504"},
    ("post", "/v1/predict"): {"401", "403", "404", "409", "413", "422", "503", "504"},
    ("post", "/v1/jobs"): {"401", "403", "404", "409", "413", "422"},
    ("get", "/v1/jobs"): {"401", "403", "422"},
    ("get", "/v1/jobs/{job_id}"): {"401", "403", "404", "422"},
    ("post", "/v1/jobs/{job_id}/cancel"): {"401", "403", "404", "409", "422"},
    ("delete", "/v1/jobs/{job_id}"): {"401", "403", "404", "409", "422"},
    ("get", "/v1/keys"): {"401", "403", "422"},
    ("post", "/v1/keys"): {"400", "401", "403", "422"},
    ("delete", "/v1/keys/{key_id}"): {"401", "403", "404", "422"},
    ("get", "/v1/jobs/{job_id}/events"): {"401", "403", "404", "422", "429"},
    ("get", "/v1/webhooks/secret"): {"401", "403"},
    ("post", "/v1/webhooks/secret"): {"401", "403"},
    ("get", "/v1/webhooks/deliveries"): {"401", "403", "404", "422"},
    ("get", "/v1/usage"): {"401", "403"},
}


def test_openapi_lists_every_route_with_its_problem_responses(client):
    spec = client.get("/openapi.json").json()
    ops = {(method, path): op for path, item in spec["paths"].items() for method, op in item.items()}
    assert set(ops) == set(EXPECTED)
    for key, codes in EXPECTED.items():
        responses = ops[key]["responses"]
        assert codes <= set(responses), (key, set(responses))
        for code in codes:
            content = responses[code]["content"]
            assert list(content) == ["application/problem+json"], (key, code, content)
            assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_openapi_documents_both_upload_bodies_and_the_key_headers(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    imported = spec["paths"]["/v1/datasets"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]
    assert imported["$ref"].endswith("/DatasetOut")  # an import answers 202 with the dataset importing
    assert "file" in body["multipart/form-data"]["schema"]["properties"]
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
