"""What one `tunery serve` process is configured with: the model's served name and the request limits."""

from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 512
# Inputs one /v1/classify request may carry: a bound on the memory a single batch can take.
MAX_CLASSIFY_INPUTS = 64


@dataclass(frozen=True)
class ServerSettings:
    """The served name (what /v1/models lists and requests may name) and the limits requests are held to."""

    name: str
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
