"""Replace the values of the process's credential variables with [redacted] in anything the trainer writes out."""

import logging
import os
import sys
from typing import Any

REDACTED = "[redacted]"
# Credentials whose names the suffix rule misses (an access key ID ends in _ID), and the rule for the rest.
_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "TUNERY_API_KEY",
    "VLLM_API_KEY",
    "HF_TOKEN",
}
_SUFFIXES = ("_KEY", "_SECRET", "_TOKEN", "_PASSWORD")
# Shorter values ("1", "true") are no secret and would redact ordinary words.
_MIN_LENGTH = 8


def _secrets() -> list[str]:
    # Read on every call: the environment may change (tests, torchrun), and it is small.
    values = {
        value
        for name, value in os.environ.items()
        if (name in _NAMES or name.endswith(_SUFFIXES)) and len(value) >= _MIN_LENGTH
    }
    # Longest first, so that a secret containing another is replaced whole.
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, REDACTED)
    return text


def redact_all(value: Any) -> Any:
    """Every string in a JSON-like value (a status patch), redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_all(item) for item in value]
    return value


class RedactingFilter(logging.Filter):
    """Redacts a record's message and traceback before a handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            # The formatter uses exc_text when it is set instead of formatting the exception itself.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True

    @classmethod
    def attach(cls, handler: logging.Handler) -> None:
        if not any(isinstance(existing, cls) for existing in handler.filters):
            handler.addFilter(cls())


def install() -> None:
    """Redact every root handler's output and uncaught exceptions (Python's and typer's own traceback print raw)."""
    for handler in logging.getLogger().handlers:
        RedactingFilter.attach(handler)

    def log_uncaught(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        logging.getLogger("tunery_trainer").critical("the trainer failed", exc_info=(kind, error, traceback))

    sys.excepthook = log_uncaught
