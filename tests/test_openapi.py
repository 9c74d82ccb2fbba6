"""The committed openapi/openapi.json must equal what the app serves."""

import json

from sluice.cli import openapi_document
from tests.conftest import ROOT

PROBLEM = "application/problem+json"


def test_committed_openapi_matches_served(client_free_app=None):
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    served = json.loads(json.dumps(openapi_document()))
    assert committed == served, "openapi/openapi.json is stale: run `sluice openapi`"


async def test_served_openapi_endpoint_equals_committed(client):
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert r.json() == committed


def test_every_operation_documents_problem_errors_and_examples():
    doc = openapi_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not path.startswith("/v1"):
                continue
            error_codes = [c for c in op["responses"] if c.startswith(("4", "5"))]
            assert error_codes, f"{method} {path} documents no errors"
            for code in error_codes:
                content = op["responses"][code]["content"]
                assert PROBLEM in content, f"{method} {path} {code} is not problem+json"
            body = op.get("requestBody")
            if body:
                schema_ref = body["content"]["application/json"]["schema"]
                ref = schema_ref.get("$ref") or schema_ref.get("anyOf", [{}])[0].get("$ref")
                schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
                assert "examples" in schema, f"{method} {path} body has no example"
