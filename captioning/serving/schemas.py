"""The API's pydantic models and the OpenAPI descriptions of its request body and errors."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hypothesis(BaseModel):
    caption: str
    logprob: float = Field(description="log-probability (sum over words and <end>)")


class CaptionResponse(BaseModel):
    caption: str
    logprob: float
    nbest: list[Hypothesis]
    model: str
    runtime: str
    beam: int
    batch_size: int = Field(description="images captioned together with this one")
    timings: dict[str, float] = Field(
        description="queue_ms (waiting for a batch), image_ms (decoding the upload), encode_ms "
        "and decode_ms (this image's share of the batch), batch_ms, total_ms (in the server)"
    )


class ErrorResponse(BaseModel):
    error: str
    detail: str


class ModelInfo(BaseModel):
    name: str
    encoder: str
    decoder: str
    runtime: str
    precision: str
    decode_defaults: dict
    max_beam: int
    test_metrics: dict | None = None
    members: list[dict] | None = None  # an ensemble's: name and weight of each member bundle


class Health(BaseModel):
    status: str
    model: str
    queued: int
    batches: int
    requests: int
    uptime_s: float


CAPTION_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "no image in the request"),
        (413, "request body over the size limit"),
        (422, "not a usable image (the detail names the cause), or a bad parameter"),
        (503, "too many requests queued"),
    )
}
_BINARY = {"type": "string", "format": "binary"}
CAPTION_BODY = {  # the image arrives as a multipart `file` field or as the raw body
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {**_BINARY}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {**_BINARY}},
            "image/*": {"schema": {**_BINARY}},
        },
    }
}
