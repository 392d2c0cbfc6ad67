"""The HTTP API's 422s for parameters FastAPI refuses: the same ``{"error", "detail"}`` JSON as
every other error of the API, one sentence naming the parameter, the value and what it accepts,
and an OpenAPI schema that advertises exactly that body."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI, Header, Query  # noqa: E402

with warnings.catch_warnings():  # starlette 1.x: "install httpx2 instead"; httpx works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from captioning.serving.app import ServeConfig, create_app  # noqa: E402
from captioning.serving.schemas import ErrorResponse  # noqa: E402
from tests.test_serve import ToneCaptioner, make_tone_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JPEG = (REPO / "artifacts" / "samples" / "chelsea.jpg").read_bytes()


def tone_app(folder: Path, **cfg) -> tuple[FastAPI, ToneCaptioner]:
    """The API on ``ToneCaptioner`` (a stand-in model that names an image's tone), with a
    bundle folder in ``folder`` that holds only its config."""
    bundle = make_tone_bundle(folder)
    tone = ToneCaptioner(bundle)
    return create_app(ServeConfig(model=str(bundle), **cfg), captioner=tone), tone


async def _probe(
    n: Annotated[int, Query(ge=2, le=5)],
    ratio: Annotated[float | None, Query(gt=0)] = None,
    x_token: Annotated[str | None, Header()] = None,
) -> dict:
    """A route with more parameters than the API's own, to see how each is described."""
    return {"n": n, "ratio": ratio, "token": x_token}


@pytest.fixture
def served(tmp_path):
    app, tone = tone_app(tmp_path)
    app.add_api_route("/v1/probe", _probe, methods=["GET"])
    with TestClient(app) as client:
        yield client, tone


def _error(r, code: str) -> str:
    """The detail of a 422 whose body is exactly ``{"error": code, "detail": ...}``."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert isinstance(body["detail"], str) and "\n" not in body["detail"]
    return body["detail"]


@pytest.mark.parametrize("beam", ["0", "abc", "-3", "2.5"])
def test_a_bad_query_beam_is_a_bad_beam_naming_the_value_and_the_range(served, beam):
    client, tone = served
    detail = _error(client.post(f"/v1/caption?beam={beam}", content=JPEG), "bad_beam")
    assert detail == f"query parameter beam must be an integer >= 1, got {beam!r}"
    assert tone.calls == []  # refused before the model


@pytest.mark.parametrize("beam", ["abc", "0"])
def test_a_bad_form_beam_is_a_bad_beam_too(served, beam):
    client, tone = served
    r = client.post("/v1/caption", files={"file": ("c.jpg", JPEG)}, data={"beam": beam})
    detail = _error(r, "bad_beam")
    assert "beam" in detail and (beam in detail or "at least 1" in detail)
    assert tone.calls == []


def test_a_good_beam_still_captions(served):
    client, tone = served
    r = client.post("/v1/caption?beam=2", content=JPEG)
    assert r.status_code == 200, r.text
    assert r.json()["beam"] == 2 and tone.calls == [(1, 2)]


def test_other_parameters_are_bad_requests_naming_each_one(served):
    client, _ = served
    assert client.get("/v1/probe?n=3").json() == {"n": 3, "ratio": None, "token": None}
    assert _error(client.get("/v1/probe?n=9"), "bad_request") == (
        "query parameter n must be an integer >= 2 and <= 5, got '9'"
    )
    assert _error(client.get("/v1/probe"), "bad_request") == "query parameter n is required"
    both = _error(client.get("/v1/probe?n=x&ratio=-1"), "bad_request")
    assert both == (
        "query parameter n must be an integer >= 2 and <= 5, got 'x'; "
        "query parameter ratio must be a number > 0, got '-1'"
    )
    long = _error(client.get("/v1/probe?n=" + "7" * 500), "bad_request")
    assert long.startswith("query parameter n must be") and len(long) < 200


def test_the_openapi_schema_advertises_every_422_as_error_response(served):
    client, _ = served
    spec = client.get("/openapi.json").json()
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/caption", "/v1/probe"):
        (op,) = spec["paths"][path].values()
        assert op["responses"]["422"]["content"]["application/json"]["schema"] == ref, path
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert "HTTPValidationError" not in json.dumps(spec)
    assert schemas["ErrorResponse"] == ErrorResponse.model_json_schema()
    assert client.get("/openapi.json").json() == spec  # built once, the same every time
