"""What ``python -m captioning serve`` runs: ``ServeConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from captioning.data.images import DEFAULT_MAX_PIXELS
from captioning.models.decoding import MAX_BEAM

MB = 1 << 20


@dataclass
class ServeConfig:
    """The served bundle, where it listens, and the limits of the micro-batcher and requests."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str = "auto"
    runtime: str = "auto"
    max_batch: int = 16  # requests encoded and decoded together
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_mb: float = 20.0  # request-size limit (413 above it)
    max_queue: int = 256  # requests waiting at most; more get 503
    max_beam: int = MAX_BEAM
    max_pixels: int = DEFAULT_MAX_PIXELS
    root_path: str = ""  # the path prefix when served behind a reverse proxy
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_beam < 1:
            raise ValueError("max_batch, max_queue and max_beam must be at least 1")
        if self.max_wait_ms < 0 or self.max_body_mb <= 0:
            raise ValueError("max_wait_ms must be >= 0 and max_body_mb > 0")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)
