"""One typed settings object, read once from the environment.

Defaults pick the embedded choice: no ``DATABASE_URL`` → embedded PostgreSQL, no
Pub/Sub settings → the ``postgres`` broker, no Cloud Tasks settings → the ``local``
task queue, no ``OPENAI_API_KEY`` → the ``offline`` LLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from core.errors import ConfigError

BrokerKind = Literal["postgres", "pubsub"]
TaskQueueKind = Literal["local", "cloudtasks"]
LLMKind = Literal["offline", "openai"]
AuthMode = Literal["apikey", "none"]

DEFAULT_GOOGLE_SEARCH_BASE_URL = "https://customsearch.googleapis.com/customsearch/v1"
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True)
class Settings:
    """Everything blogpipe reads from its environment, validated."""

    database_url: str | None = None
    port: int = 8000
    host: str = "127.0.0.1"
    data_dir: Path = Path(".blogpipe")
    broker: BrokerKind = "postgres"
    task_queue: TaskQueueKind = "local"
    llm: LLMKind = "offline"

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    offline_llm_delay: float = 0.0

    pubsub_emulator_host: str | None = None
    cloud_tasks_emulator_host: str | None = None
    google_cloud_project: str = "blogpipe-local"
    gcp_location: str = "europe-west1"
    cloud_tasks_queue_name: str = "blog-generation-queue"
    cloud_run_worker_url: str | None = None
    cloud_run_service_name: str = "blog-writer-api-dev"
    cloud_tasks_service_account: str | None = None
    worker_audience: str | None = None
    worker_allowed_service_accounts: tuple[str, ...] = ()
    worker_shared_secret: str | None = None
    pubsub_push_audience: str | None = None
    pubsub_max_messages: int = 100

    webhook_secret: str | None = None
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    webhook_timeout: float = 10.0
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_previous_secrets: tuple[str, ...] = ()
    webhook_allow_http: bool = False
    webhook_max_in_flight: int = 200
    openai_structured_mode: str = "json_schema"
    llm_max_concurrency: int = 16
    openai_stage_models: Mapping[str, str] = field(default_factory=dict)
    google_search_api_key: str | None = None
    google_search_engine_id: str | None = None
    google_search_base_url: str = DEFAULT_GOOGLE_SEARCH_BASE_URL
    search_blocked_domains: tuple[str, ...] = ()
    author_name: str = "blogpipe"
    publisher_name: str = "blogpipe"

    max_delivery_attempts: int = 5
    stage_lease_seconds: float = 30.0
    ack_deadline_seconds: float = 60.0
    min_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    db_pool_size: int = 10
    job_retention_hours: float = 24.0
    stuck_after_seconds: float = 600.0
    sweep_interval_seconds: float = 30.0
    max_redrives: int = 3  # re-drives of a stuck or dead-lettered stage before the job fails
    replay_cap: int = 100
    public_base_url: str | None = None
    log_level: str = "INFO"
    # Who may call the public API: "apikey" (Bearer keys bound to a tenant) or "none"
    # (single tenant "default", open to anyone who can reach it; must be chosen explicitly).
    auth: AuthMode = "apikey"
    cors_allowed_origins: tuple[str, ...] = ()
    rate_limit_per_second: float = 10.0  # job submissions per tenant; 0 turns it off
    rate_limit_burst: int = 100
    max_in_flight: int = 1000  # queued + processing jobs per tenant; 0 turns it off
    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    max_json_depth: int = 32
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def worker_url(self) -> str:
        """Where Cloud Tasks POSTs jobs; the seed's Cloud Run URL unless set."""
        if self.cloud_run_worker_url:
            return self.cloud_run_worker_url
        return (
            f"https://{self.cloud_run_service_name}-{self.google_cloud_project}"
            f".{self.gcp_location}.run.app/api/v1/blog/worker"
        )

    def with_changes(self, **changes: object) -> Settings:
        """A copy with some fields replaced (tests and the dev command use it)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment; raise ConfigError naming the bad variable."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        rate = reader.rate("BLOGPIPE_RATE_LIMIT", (10.0, 100))
        project = reader.text("GOOGLE_CLOUD_PROJECT")
        pubsub_host = reader.text("PUBSUB_EMULATOR_HOST")
        tasks_host = reader.text("CLOUD_TASKS_EMULATOR_HOST")
        api_key = reader.text("OPENAI_API_KEY")
        default_broker = "pubsub" if (pubsub_host or project) else "postgres"
        default_queue = "cloudtasks" if (tasks_host or project) else "local"
        settings = cls(
            database_url=reader.text("DATABASE_URL"),
            port=reader.integer("PORT", 8000, minimum=0, maximum=65535),
            host=reader.text("HOST") or "127.0.0.1",
            data_dir=Path(reader.text("BLOGPIPE_DATA_DIR") or ".blogpipe"),
            broker=reader.choice("BLOGPIPE_BROKER", ("postgres", "pubsub"), default_broker),  # type: ignore[arg-type]
            task_queue=reader.choice(  # type: ignore[arg-type]
                "BLOGPIPE_TASK_QUEUE", ("local", "cloudtasks"), default_queue
            ),
            llm=reader.choice(  # type: ignore[arg-type]
                "BLOGPIPE_LLM", ("offline", "openai"), "openai" if api_key else "offline"
            ),
            openai_api_key=api_key,
            openai_base_url=reader.text("OPENAI_BASE_URL"),
            openai_model=reader.text("OPENAI_MODEL") or "gpt-4o-mini",
            offline_llm_delay=reader.number("BLOGPIPE_OFFLINE_LLM_DELAY", 0.0, minimum=0.0),
            pubsub_emulator_host=pubsub_host,
            cloud_tasks_emulator_host=tasks_host,
            google_cloud_project=project or "blogpipe-local",
            gcp_location=reader.text("GCP_LOCATION") or "europe-west1",
            cloud_tasks_queue_name=reader.text("CLOUD_TASKS_QUEUE_NAME") or "blog-generation-queue",
            cloud_run_worker_url=reader.url("CLOUD_RUN_WORKER_URL"),
            cloud_run_service_name=reader.text("CLOUD_RUN_SERVICE_NAME") or "blog-writer-api-dev",
            cloud_tasks_service_account=reader.text("CLOUD_TASKS_SERVICE_ACCOUNT"),
            worker_audience=reader.text("WORKER_OIDC_AUDIENCE"),
            worker_allowed_service_accounts=reader.csv("WORKER_ALLOWED_SERVICE_ACCOUNTS"),
            worker_shared_secret=reader.text("WORKER_SHARED_SECRET"),
            pubsub_push_audience=reader.text("PUBSUB_PUSH_AUDIENCE"),
            pubsub_max_messages=reader.integer("PUBSUB_MAX_MESSAGES", 100, minimum=1),
            webhook_secret=reader.webhook_secret("WEBHOOK_SECRET"),
            webhook_retry_schedule=reader.schedule(
                "WEBHOOK_RETRY_SCHEDULE", DEFAULT_WEBHOOK_RETRY_SCHEDULE
            ),
            webhook_timeout=reader.number("WEBHOOK_TIMEOUT", 10.0, minimum=0.1),
            webhook_allowed_hosts=reader.csv("WEBHOOK_ALLOWED_HOSTS"),
            webhook_previous_secrets=reader.secrets("WEBHOOK_PREVIOUS_SECRETS"),
            webhook_allow_http=reader.boolean("WEBHOOK_ALLOW_HTTP", False),
            webhook_max_in_flight=reader.integer(
                "WEBHOOK_MAX_IN_FLIGHT", 200, minimum=1, maximum=10_000
            ),
            openai_structured_mode=reader.choice(
                "OPENAI_STRUCTURED_MODE", ("json_schema", "json_object", "prompt"), "json_schema"
            ),
            llm_max_concurrency=reader.integer("BLOGPIPE_LLM_CONCURRENCY", 16, minimum=1),
            openai_stage_models={
                stage: model
                for stage in ("research", "outline", "draft", "seo")
                if (model := reader.text(f"OPENAI_MODEL_{stage.upper()}"))
            },
            google_search_api_key=reader.text("GOOGLE_SEARCH_API_KEY"),
            google_search_engine_id=reader.text("GOOGLE_SEARCH_ENGINE_ID"),
            google_search_base_url=reader.url("GOOGLE_SEARCH_BASE_URL")
            or DEFAULT_GOOGLE_SEARCH_BASE_URL,
            search_blocked_domains=tuple(
                domain.lower().removeprefix("www.")
                for domain in reader.csv("SEARCH_BLOCKED_DOMAINS")
            ),
            author_name=reader.text("BLOGPIPE_AUTHOR_NAME") or "blogpipe",
            publisher_name=reader.text("BLOGPIPE_PUBLISHER_NAME") or "blogpipe",
            max_delivery_attempts=reader.integer(
                "BLOGPIPE_MAX_ATTEMPTS", 5, minimum=1, maximum=100
            ),
            stage_lease_seconds=reader.number("BLOGPIPE_STAGE_LEASE", 30.0, minimum=1.0),
            ack_deadline_seconds=reader.number("BLOGPIPE_ACK_DEADLINE", 60.0, minimum=1.0),
            min_backoff_seconds=reader.number("BLOGPIPE_MIN_BACKOFF", 1.0, minimum=0.0),
            max_backoff_seconds=reader.number("BLOGPIPE_MAX_BACKOFF", 60.0, minimum=0.0),
            db_pool_size=reader.integer("BLOGPIPE_DB_POOL_SIZE", 10, minimum=1, maximum=500),
            job_retention_hours=reader.number("JOB_RETENTION_HOURS", 24.0, minimum=0.0),
            stuck_after_seconds=reader.number("BLOGPIPE_STUCK_AFTER", 600.0, minimum=1.0),
            sweep_interval_seconds=reader.number("BLOGPIPE_SWEEP_INTERVAL", 30.0, minimum=0.1),
            max_redrives=reader.integer("BLOGPIPE_MAX_REDRIVES", 3, minimum=0, maximum=100),
            replay_cap=reader.integer("BLOGPIPE_REPLAY_CAP", 100, minimum=1),
            public_base_url=reader.url("BLOGPIPE_PUBLIC_URL"),
            log_level=reader.choice(
                "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            ),
            auth=reader.choice("BLOGPIPE_AUTH", ("apikey", "none"), "apikey"),  # type: ignore[arg-type]
            cors_allowed_origins=reader.csv("CORS_ALLOWED_ORIGINS"),
            rate_limit_per_second=rate[0],
            rate_limit_burst=rate[1],
            max_in_flight=reader.integer("BLOGPIPE_MAX_IN_FLIGHT", 1000, minimum=0),
            max_body_bytes=reader.integer("BLOGPIPE_MAX_BODY_BYTES", 64 * 1024, minimum=1024),
            max_header_bytes=reader.integer("BLOGPIPE_MAX_HEADER_BYTES", 16 * 1024, minimum=1024),
            max_json_depth=reader.integer("BLOGPIPE_MAX_JSON_DEPTH", 32, minimum=2, maximum=512),
        )
        if any(origin == "*" for origin in settings.cors_allowed_origins):
            raise ConfigError("CORS_ALLOWED_ORIGINS must list the origins; '*' is not allowed")
        if settings.broker == "pubsub" and not 5 <= settings.max_delivery_attempts <= 100:
            raise ConfigError(
                "BLOGPIPE_MAX_ATTEMPTS must be between 5 and 100 with BLOGPIPE_BROKER=pubsub"
                " (Pub/Sub dead-letter policies allow no fewer than 5 delivery attempts)"
            )
        if settings.llm == "openai" and not (settings.openai_api_key or settings.openai_base_url):
            raise ConfigError("BLOGPIPE_LLM=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL)")
        return settings


class _Reader:
    """Reads typed values and names the variable in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        return int(self._bounded(name, value, minimum, maximum))

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value != value:  # NaN
            raise ConfigError(f"{name} must be a number, got {raw!r}")
        return self._bounded(name, value, minimum, maximum)

    def choice(
        self, name: str, options: tuple[str, ...], default: str, *, upper: bool = False
    ) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}; got {raw!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def csv(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        return tuple(part.strip() for part in raw.split(",") if part.strip())

    def rate(self, name: str, default: tuple[float, int]) -> tuple[float, int]:
        """``RATE`` or ``RATE:BURST`` (per second; burst defaults to 10 x rate; 0 = off)."""
        raw = self.text(name)
        if raw is None:
            return default
        per_second, _, burst = raw.partition(":")
        try:
            rate = float(per_second)
            size = int(burst) if burst.strip() else max(1, int(rate * 10))
        except ValueError:
            raise ConfigError(f"{name} must be RATE or RATE:BURST (10:100); got {raw!r}") from None
        if not rate >= 0 or size < 1:
            raise ConfigError(f"{name} needs a rate >= 0 and a burst >= 1; got {raw!r}")
        return rate, size

    def url(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is not None and not raw.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
        return raw

    def webhook_secret(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is not None and not raw.startswith("whsec_"):
            raise ConfigError(f"{name} must be a Standard Webhooks secret starting with 'whsec_'")
        return raw

    def secrets(self, name: str) -> tuple[str, ...]:
        values = self.csv(name)
        if any(not value.startswith("whsec_") for value in values):
            raise ConfigError(f"{name} must list Standard Webhooks secrets starting with 'whsec_'")
        return values

    def schedule(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            values = tuple(float(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated seconds, got {raw!r}") from None
        if not values or any(value < 0 for value in values):
            raise ConfigError(f"{name} must list at least one non-negative number of seconds")
        return values

    @staticmethod
    def _bounded(name: str, value: float, minimum: float | None, maximum: float | None) -> float:
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}, got {value}")
        return value
