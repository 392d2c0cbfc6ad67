"""The API's pydantic models and the OpenAPI descriptions of its request body and errors."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hypothesis(BaseModel):
    caption: str
    logprob: float = Field(description="log-probability (sum over words and <end>)")


class Label(BaseModel):
    label: str
    prob: float


class ClassifierOpinion(BaseModel):
    source: str = Field(description="whose opinion: the encoder's own ImageNet classifier")
    top: list[Label] = Field(description="top-K ImageNet labels, best first")
    unavailable: str | None = Field(
        None, description="why there are no labels (e.g. VGG16's weights carry no classifier)"
    )


class CaptionResponse(BaseModel):
    caption: str
    logprob: float
    confidence: float = Field(
        description="0..1, how sure the model is: the geometric mean of the probabilities of the "
        "caption's words and its end token (docs/results.md: how well it ranks captions)"
    )
    prefix: str = Field("", description="the words the caption was made to start with")
    labels: ClassifierOpinion | None = Field(
        None, description="with labels=K: the classifier's second opinion, not the captioner's"
    )
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
                    "properties": {
                        "file": {**_BINARY},
                        "beam": {"type": "integer", "minimum": 1},
                        "prefix": {"type": "string", "description": "words to start with"},
                        "labels": {"type": "integer", "minimum": 1, "description": "top-K"},
                    },
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {**_BINARY}},
            "image/*": {"schema": {**_BINARY}},
        },
    }
}
