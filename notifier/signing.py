"""Standard Webhooks signatures (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).

Signing goes through the ``standardwebhooks`` package so any Standard Webhooks or Svix
verifier accepts what we send. During a secret rotation every active secret signs,
and the signatures are joined with spaces, as the spec allows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from standardwebhooks import Webhook

from core.errors import ConfigError

SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class Signer:
    """Signs webhook bodies with one or more active ``whsec_`` secrets (newest first)."""

    secrets: tuple[str, ...]
    _keys: tuple[Webhook, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ConfigError("WEBHOOK_SECRET is required to sign webhooks (a 'whsec_…' secret)")
        for secret in self.secrets:
            if not secret.startswith(SECRET_PREFIX):
                raise ConfigError("webhook secrets must be Standard Webhooks secrets ('whsec_…')")
        # Fail at start-up, not on the first delivery, when a secret is not valid base64;
        # the decoded keys are kept for signing.
        try:
            keys = tuple(Webhook(secret) for secret in self.secrets)
        except Exception as exc:
            raise ConfigError(f"a webhook secret is not valid base64: {exc}") from exc
        object.__setattr__(self, "_keys", keys)

    @classmethod
    def from_secrets(cls, secret: str | None, previous: Sequence[str] = ()) -> Signer:
        """A signer for ``secret`` plus still-active ``previous`` secrets (rotation overlap)."""
        ordered = [s for s in (secret, *previous) if s]
        return _signer(tuple(dict.fromkeys(ordered)))

    def for_endpoint(
        self,
        secret: str | None,
        previous: str | None = None,
        previous_expires_at: datetime | None = None,
    ) -> Signer:
        """The signer for an endpoint with its own secret (else this one); its previous
        secret keeps signing until ``previous_expires_at``."""
        if not secret:
            return self
        still_active = previous and (
            previous_expires_at is None or previous_expires_at > datetime.now(UTC)
        )
        return Signer.from_secrets(secret, [previous] if still_active and previous else [])

    def signature(self, msg_id: str, timestamp: datetime, body: bytes) -> str:
        """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space-separated,
        over ``body`` as sent (UTF-8)."""
        when = utc(timestamp)
        text = body.decode()  # the package signs text (and encodes it back to UTF-8)
        return " ".join(key.sign(msg_id, when, text) for key in self._keys)

    def headers(
        self, msg_id: str, body: bytes, *, timestamp: datetime | None = None
    ) -> dict[str, str]:
        """The three Standard Webhooks headers for one attempt (timestamp defaults to now)."""
        when = utc(timestamp or datetime.now(UTC))
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": self.signature(msg_id, when, body),
        }


@functools.lru_cache(maxsize=256)
def _signer(secrets: tuple[str, ...]) -> Signer:
    # A signer never changes, so one per set of secrets serves every delivery signed
    # with them (endpoint signers are asked for on every attempt).
    return Signer(secrets)


def utc(value: datetime) -> datetime:
    """``value`` converted to UTC; naive datetimes are taken to be UTC already.

    standardwebhooks 1.1.0 *replaces* tzinfo with UTC instead of converting, so an aware
    non-UTC datetime would be signed with the wrong epoch seconds without this.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
