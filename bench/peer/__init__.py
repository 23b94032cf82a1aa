"""The peer: the same four-stage pipeline written idiomatically with Celery and Redis.

An HTTP endpoint stores the job in Postgres and starts a ``chain`` of four tasks
(research → outline → draft → seo). Each task runs blogpipe's own stage code with the
offline LLM, so both sides do the same work per stage; what differs is the orchestration.
Progress goes to Postgres; the last task POSTs a Standard Webhooks-signed callback.
"""

MISSING = (
    "the Celery peer needs celery and the redis client: "
    ".venv/bin/pip install 'celery[redis]>=5.4' 'psycopg[binary]>=3.1'"
)


def require_peer_dependencies() -> None:
    """Raise ImportError with the install line when celery, redis or psycopg is missing."""
    try:
        import celery  # noqa: F401
        import psycopg  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{MISSING} ({exc})") from exc
