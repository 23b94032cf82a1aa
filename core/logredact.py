"""Keep secrets out of logs: API keys, Standard Webhooks secrets and bearer tokens are
replaced by ``[REDACTED]`` in every record, whatever handler later writes it.

``install()`` wraps ``Logger.makeRecord``, so a record is redacted once, when it is made
(only for records that pass the logger's level), extras included, before any handler,
formatter or test's capture sees it. (The record factory hook would miss ``extra=``
values: they are set after the factory returns.) ``RedactingFilter`` does the same for
a single handler.
"""

from __future__ import annotations

import logging
import re
import traceback
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS = (
    # blogpipe API keys (and any key of the same family).
    re.compile(r"bp_(?:live|test)_[A-Za-z0-9_\-]+"),
    # Standard Webhooks signing secrets.
    re.compile(r"whsec_[A-Za-z0-9+/=_\-]+"),
    # Bearer tokens (API keys, Google ID tokens) wherever an Authorization value is logged.
    re.compile(r"(?i)(?<=bearer )[A-Za-z0-9._~+/=\-]{8,}"),
    # A bare JWT (header.payload.signature, the header always starts with '{"' -> eyJ).
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"),
)
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})))


def redact(text: str) -> str:
    """``text`` with every secret replaced."""
    # Every match of ``_PATTERNS`` contains one of these literals (in lower case): most
    # log text has none, and is returned without running the four regexes over it.
    lower = text.lower()
    if (
        "bp_" not in lower
        and "whsec_" not in lower
        and "eyj" not in lower
        and "bearer " not in lower
    ):
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a record in place: its message, extras, exception and stack texts."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: let the handler report it as usual
        return record
    record.msg = redact(message)
    record.args = None
    for name, value in list(vars(record).items()):
        if name not in _STANDARD_ATTRS:
            setattr(record, name, _redact_value(value))
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        # Formatters print exc_text when it is set; exc_info stays for code that inspects
        # the exception (a handler that re-renders it itself must redact on its own).
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record passing through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_installed = False


def install() -> None:
    """Redact every log record this process makes (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.Logger.makeRecord

    def redacting_make_record(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(make_record(self, *args, **kwargs))

    logging.Logger.makeRecord = redacting_make_record  # type: ignore[method-assign]
    _installed = True
