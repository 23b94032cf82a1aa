"""Web search: the Google Programmable Search (Custom Search JSON API) client over httpx.

The only module that knows that API. One ``search(query)`` returns plain ``SearchHit``
values; choosing, de-duplicating and filtering sources is the research stage's job.
Timeouts, connection errors, 429 and 5xx are ``RetryableError``; any other 4xx means the
key, engine id or request is wrong and is a ``PermanentError`` that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from core.errors import PermanentError, RetryableError
from core.settings import Settings

if TYPE_CHECKING:
    import httpx

PROVIDER = "google_cse"
MAX_RESULTS_PER_QUERY = 10
"""The API's own cap on ``num``."""
_RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class SearchHit:
    """One organic result."""

    url: str
    title: str
    snippet: str
    query: str


def search_configured(settings: Settings) -> bool:
    """Whether both credentials are set."""
    return bool(settings.google_search_api_key and settings.google_search_engine_id)


def _error_detail(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return response.text[:200]
    reasons = ", ".join(
        str(item.get("reason")) for item in error.get("errors") or [] if item.get("reason")
    )
    message = str(error.get("message") or "")[:300]
    return f"{message} ({reasons})" if reasons else message


class GoogleSearch:
    """Async client of the Custom Search JSON API; use as ``async with``."""

    def __init__(
        self,
        api_key: str,
        engine_id: str,
        *,
        base_url: str,
        timeout: float = 10.0,
        language: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.engine_id = engine_id
        self.base_url = base_url
        self.language = language
        # httpx (with click and rich, where installed: about 6 MB) loads only for web search.
        import httpx

        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            transport=httpx.AsyncHTTPTransport(retries=1),
            headers={"Accept": "application/json"},
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> GoogleSearch:
        """The client for ``GOOGLE_SEARCH_*`` settings (call ``search_configured`` first)."""
        if not (settings.google_search_api_key and settings.google_search_engine_id):
            raise PermanentError(
                "web search needs GOOGLE_SEARCH_API_KEY and GOOGLE_SEARCH_ENGINE_ID"
            )
        return cls(
            settings.google_search_api_key,
            settings.google_search_engine_id,
            base_url=settings.google_search_base_url,
        )

    async def search(self, query: str, *, count: int = MAX_RESULTS_PER_QUERY) -> list[SearchHit]:
        """The top ``count`` (≤ 10) results for a plain-language query."""
        params: dict[str, Any] = {
            "key": self.api_key,
            "cx": self.engine_id,
            "q": query,
            "num": max(1, min(count, MAX_RESULTS_PER_QUERY)),
            "safe": "active",
        }
        if self.language:
            params["lr"] = f"lang_{self.language}"
        import httpx

        try:
            response = await self._client.get(self.base_url, params=params)
        except httpx.TimeoutException as exc:
            raise RetryableError(f"web search timed out for {query!r}") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"web search unreachable ({type(exc).__name__}): {exc}") from exc
        status = response.status_code
        if status in _RETRYABLE_STATUS or status >= 500:
            raise RetryableError(f"web search returned HTTP {status}: {_error_detail(response)}")
        if status >= 400:
            raise PermanentError(
                f"web search rejected the request with HTTP {status}: {_error_detail(response)}"
                " — check GOOGLE_SEARCH_API_KEY, GOOGLE_SEARCH_ENGINE_ID and that the Custom"
                " Search API is enabled for the key"
            )
        try:
            items = response.json().get("items") or []
        except ValueError as exc:
            raise RetryableError("web search returned a body that is not JSON") from exc
        return [
            SearchHit(
                url=str(item.get("link") or "").strip(),
                title=" ".join(str(item.get("title") or "").split()),
                snippet=" ".join(str(item.get("snippet") or "").split()),
                query=query,
            )
            for item in items
            if isinstance(item, dict) and item.get("link")
        ]

    async def close(self) -> None:
        """Release HTTP connections."""
        await self._client.aclose()

    async def __aenter__(self) -> GoogleSearch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
