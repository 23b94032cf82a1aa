"""Secrets never reach the logs: API keys, webhook secrets, bearer tokens."""

from __future__ import annotations

import logging
import random

import pytest

from core import logredact
from core.db.apikeys import generate_key
from core.logredact import REDACTED, RedactingFilter, redact

API_KEY = generate_key()
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJlbWFpbCI6ImFAYi5jIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
SECRETS = (API_KEY, WEBHOOK_SECRET, JWT, "opaque-bearer-token-123")


@pytest.fixture(autouse=True)
def redaction() -> None:
    logredact.install()


def test_redact_patterns() -> None:
    text = (
        f"key={API_KEY} secret={WEBHOOK_SECRET} Authorization: Bearer {JWT} "
        "authorization: bearer opaque-bearer-token-123 jwt " + JWT
    )
    cleaned = redact(text)
    for secret in SECRETS:
        assert secret not in cleaned
    assert cleaned.count(REDACTED) == 5
    assert redact("nothing to hide, bearer of news") == "nothing to hide, bearer of news"


def test_log_records_are_redacted_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("blogpipe.test.redaction")
    caplog.set_level(logging.DEBUG, logger="blogpipe.test.redaction")
    logger.info("Authorization: Bearer %s", API_KEY)
    logger.warning(
        "Signing with %s",
        WEBHOOK_SECRET,
        extra={"secret": WEBHOOK_SECRET, "headers": {"authorization": f"Bearer {JWT}"}},
    )
    try:
        raise ValueError(f"bad key {API_KEY}")
    except ValueError:
        logger.exception("Failed with bearer opaque-bearer-token-123")
    captured = caplog.text + "".join(
        repr({k: v for k, v in vars(record).items() if k != "exc_info"})
        for record in caplog.records
    )
    assert caplog.records[2].exc_info is not None  # kept for code that inspects it
    for secret in SECRETS:
        assert secret not in captured
    assert REDACTED in caplog.text
    assert caplog.records[1].secret == REDACTED


def test_filter_for_a_single_handler() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", (API_KEY,), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"key {REDACTED}"


def test_the_quick_check_never_skips_a_secret() -> None:
    """``redact`` skips the regexes for text without their literals: on random text made
    of those literals' pieces (any case), it gives what the regexes alone give."""
    rng = random.Random(7)
    pieces = [
        "bp_",
        "live_",
        "test_",
        "whsec_",
        "eyJ",
        "EYJ",
        "bearer ",
        "BeArEr ",
        "Bearer",
        "abcXYZ09",
        "-",
        "_",
        ".",
        " ",
        "\\n",
        "é",
        "token-1234567",
    ]

    def regexes_only(text: str) -> str:
        for pattern in logredact._PATTERNS:
            text = pattern.sub(REDACTED, text)
        return text

    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.5:
            text = "".join(c.upper() if rng.random() < 0.3 else c for c in text)
        assert redact(text) == regexes_only(text), text
