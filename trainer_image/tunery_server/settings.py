"""What one `tunery serve` process is configured with: the model's served name, the request limits, the API key."""

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_CONCURRENT_REQUESTS = 8
# Inputs one /v1/classify request may carry: a bound on the memory a single batch can take.
MAX_CLASSIFY_INPUTS = 64


@dataclass(frozen=True)
class ServerSettings:
    """The served name (what /v1/models lists and requests may name), the limits requests are held to, the key."""

    name: str
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    # None: the API is open. Left out of the repr, so that logging the settings never logs the key.
    api_key: str | None = field(default=None, repr=False)
