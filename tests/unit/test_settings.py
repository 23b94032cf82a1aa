"""Settings: embedded defaults, and every bad value names its variable."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.settings import Settings


def test_defaults_pick_the_embedded_choices() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert (settings.broker, settings.task_queue, settings.llm) == ("postgres", "local", "offline")
    assert settings.port == 8000 and str(settings.data_dir) == ".blogpipe"
    assert settings.gcp_location == "europe-west1"
    assert settings.cloud_tasks_queue_name == "blog-generation-queue"
    assert settings.worker_url == (
        "https://blog-writer-api-dev-blogpipe-local.europe-west1.run.app/api/v1/blog/worker"
    )


def test_google_settings_select_the_google_adapters() -> None:
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "acme", "OPENAI_API_KEY": "sk-x"})
    assert (settings.broker, settings.task_queue, settings.llm) == (
        "pubsub",
        "cloudtasks",
        "openai",
    )
    explicit = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "acme", "BLOGPIPE_BROKER": "postgres"})
    assert explicit.broker == "postgres"


def test_max_redrives_reaches_the_sweeper_and_dead_letter_settings() -> None:
    assert Settings.from_env({}).max_redrives == 3
    assert Settings.from_env({"BLOGPIPE_MAX_REDRIVES": "0"}).max_redrives == 0
    assert Settings.from_env({"BLOGPIPE_MAX_REDRIVES": "12"}).max_redrives == 12


def test_webhook_posts_in_flight_are_read() -> None:
    assert Settings.from_env({}).webhook_max_in_flight == 200
    assert Settings.from_env({"WEBHOOK_MAX_IN_FLIGHT": "25"}).webhook_max_in_flight == 25


def test_previous_webhook_secrets_are_read_for_rotation() -> None:
    settings = Settings.from_env({"WEBHOOK_PREVIOUS_SECRETS": "whsec_a, whsec_b"})
    assert settings.webhook_previous_secrets == ("whsec_a", "whsec_b")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BLOGPIPE_BROKER": "kafka"}, "BLOGPIPE_BROKER"),
        ({"BLOGPIPE_TASK_QUEUE": "sqs"}, "BLOGPIPE_TASK_QUEUE"),
        ({"BLOGPIPE_LLM": "magic"}, "BLOGPIPE_LLM"),
        ({"PORT": "99999"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"BLOGPIPE_OFFLINE_LLM_DELAY": "nan"}, "BLOGPIPE_OFFLINE_LLM_DELAY"),
        ({"WEBHOOK_SECRET": "secret"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_PREVIOUS_SECRETS": "whsec_a,plain"}, "WEBHOOK_PREVIOUS_SECRETS"),
        ({"WEBHOOK_RETRY_SCHEDULE": "1,x"}, "WEBHOOK_RETRY_SCHEDULE"),
        ({"WEBHOOK_ALLOW_HTTP": "maybe"}, "WEBHOOK_ALLOW_HTTP"),
        ({"CLOUD_RUN_WORKER_URL": "worker"}, "CLOUD_RUN_WORKER_URL"),
        ({"BLOGPIPE_BROKER": "pubsub", "BLOGPIPE_MAX_ATTEMPTS": "3"}, "BLOGPIPE_MAX_ATTEMPTS"),
        ({"BLOGPIPE_LLM": "openai"}, "OPENAI_API_KEY"),
        ({"BLOGPIPE_MAX_REDRIVES": "-1"}, "BLOGPIPE_MAX_REDRIVES"),
        ({"BLOGPIPE_MAX_REDRIVES": "three"}, "BLOGPIPE_MAX_REDRIVES"),
        ({"WEBHOOK_MAX_IN_FLIGHT": "0"}, "WEBHOOK_MAX_IN_FLIGHT"),
        ({"WEBHOOK_MAX_IN_FLIGHT": "many"}, "WEBHOOK_MAX_IN_FLIGHT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)
