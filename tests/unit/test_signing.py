"""Standard Webhooks signing: the spec's test vector, both verifiers, rotation, tampering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import standardwebhooks
import svix.webhooks

from core.errors import ConfigError
from notifier.signing import Signer

SECRET = "whsec_plJ3nmyCDGBKInavdOK15jsl"
MSG_ID = "msg_loFOjxBNrRLzqYUf"
TIMESTAMP = 1731705121
BODY = b'{"event_type":"ping","data":{"success":true}}'
EXPECTED = "v1,rAvfW3dJ/X/qxhsaXPOyyCGmRKsaKWcsNccKXlIktD0="
OTHER_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_spec_test_vector_reproduces_exactly() -> None:
    when = datetime.fromtimestamp(TIMESTAMP, tz=UTC)
    assert Signer((SECRET,)).signature(MSG_ID, when, BODY) == EXPECTED


def test_non_utc_timestamps_are_converted_not_relabelled() -> None:
    when = datetime.fromtimestamp(TIMESTAMP, tz=timezone(timedelta(hours=5)))
    headers = Signer((SECRET,)).headers(MSG_ID, BODY, timestamp=when)
    assert headers["webhook-timestamp"] == str(TIMESTAMP)
    assert headers["webhook-signature"] == EXPECTED


def test_headers_verify_with_standardwebhooks_and_svix() -> None:
    headers = Signer((SECRET,)).headers(MSG_ID, BODY)
    assert standardwebhooks.Webhook(SECRET).verify(BODY, headers) == {
        "event_type": "ping",
        "data": {"success": True},
    }
    svix.webhooks.Webhook(SECRET).verify(BODY, headers)


def test_a_body_beyond_ascii_is_signed_as_the_utf8_bytes_sent() -> None:
    body = '{"type":"job.completed","data":{"title":"Tea \u2615 \u2014 a guide\u2026"}}'.encode()
    headers = Signer((SECRET,)).headers(MSG_ID, body)
    assert (
        standardwebhooks.Webhook(SECRET).verify(body, headers)["data"]["title"].endswith("\u2026")
    )
    svix.webhooks.Webhook(SECRET).verify(body, headers)


def test_rotation_signs_with_every_active_secret() -> None:
    headers = Signer.from_secrets(OTHER_SECRET, [SECRET]).headers(MSG_ID, BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OTHER_SECRET):
        standardwebhooks.Webhook(secret).verify(BODY, headers)
        svix.webhooks.Webhook(secret).verify(BODY, headers)


def test_tampered_body_fails_verification() -> None:
    headers = Signer((SECRET,)).headers(MSG_ID, BODY)
    tampered = BODY.replace(b"true", b"false")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(tampered, headers)
    with pytest.raises(svix.webhooks.WebhookVerificationError):
        svix.webhooks.Webhook(SECRET).verify(tampered, headers)


def test_stale_timestamp_fails_verification() -> None:
    stale = datetime.now(UTC) - timedelta(minutes=10)
    headers = Signer((SECRET,)).headers(MSG_ID, BODY, timestamp=stale)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(BODY, headers)
    with pytest.raises(svix.webhooks.WebhookVerificationError):
        svix.webhooks.Webhook(SECRET).verify(BODY, headers)


def test_wrong_secret_fails_verification() -> None:
    headers = Signer((OTHER_SECRET,)).headers(MSG_ID, BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(BODY, headers)


@pytest.mark.parametrize("secrets", [(), ("not-a-whsec",), ("whsec_!!!",)])
def test_missing_or_bad_secret_is_a_config_error(secrets: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="secret"):
        Signer(secrets)
