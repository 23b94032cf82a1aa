"""Research sources: search queries from a request, and choosing citable sources.

Sources are de-duplicated by normalised URL (scheme, ``www.``, fragment, tracking
parameters and trailing slash do not make a page different), block-listed domains are
dropped, and the selection prefers several distinct domains over many pages of one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from core.requests import BlogRequest, ResearchDepth
from core.search import SearchHit

MAX_SOURCES = 8
MAX_PER_DOMAIN = 2
MAX_SNIPPETS = 3
QUERY_COUNT: dict[ResearchDepth, int] = {
    ResearchDepth.basic: 2,
    ResearchDepth.standard: 3,
    ResearchDepth.comprehensive: 4,
}
_OPERATOR = re.compile(
    r"(?<!\S)-?(?:site|inurl|allinurl|intitle|allintitle|intext|allintext|filetype|ext|"
    r"related|cache|link|info|before|after|source|loc|location):\S*",
    re.IGNORECASE,
)
_TRACKING = re.compile(r"^(utm_\w+|gclid|fbclid|msclkid|mc_cid|mc_eid|ref|ref_src)$", re.I)


@dataclass
class CandidateSource:
    """A source being collected: its first URL and title, every distinct snippet."""

    url: str
    title: str
    domain: str
    snippets: list[str] = field(default_factory=list)


def plain_query(text: str) -> str:
    """Search text without operators (``site:``, ``intitle:``…), quotes or exclusions."""
    text = _OPERATOR.sub(" ", text)
    text = re.sub(r"[\"“”]|(?<!\S)-(?=\S)|\b(OR|AND)\b", " ", text)
    return " ".join(text.split())


def build_queries(request: BlogRequest) -> list[str]:
    """Two to four distinct plain-language queries, more for deeper research."""
    primary = request.keywords[0]
    secondary = request.keywords[1] if len(request.keywords) > 1 else None
    candidates = [
        request.topic,
        f"{primary} {secondary}" if secondary else f"{primary} guide",
        f"{primary} expert advice",
        f"{primary} statistics and research",
        f"{primary} common questions",
    ]
    wanted = QUERY_COUNT[request.research_depth or ResearchDepth.standard]
    queries: dict[str, str] = {}
    for candidate in candidates:
        query = plain_query(candidate)
        if query and query.lower() not in queries:
            queries[query.lower()] = query
    return list(queries.values())[:wanted]


def domain_of(url: str) -> str:
    """Lower-case host without ``www.`` (empty when the URL has none)."""
    host = (urlsplit(url.strip()).hostname or "").lower()
    return host.removeprefix("www.")


def normalise_url(url: str) -> str:
    """The URL as a de-duplication key: https, no www, fragment or tracking parameters."""
    parts = urlsplit(url.strip())
    query = sorted((k, v) for k, v in parse_qsl(parts.query) if not _TRACKING.match(k))
    path = parts.path.rstrip("/") or "/"
    port = f":{parts.port}" if parts.port and parts.port not in (80, 443) else ""
    return urlunsplit(("https", domain_of(url) + port, path, urlencode(query), ""))


def is_blocked(domain: str, blocked: Iterable[str]) -> bool:
    """Whether ``domain`` is a block-listed domain or one of its subdomains."""
    return any(domain == b or domain.endswith(f".{b}") for b in blocked)


def _interleaved(hits_per_query: Sequence[Sequence[SearchHit]]) -> list[SearchHit]:
    """First results of every query, then the second ones, …: no query dominates."""
    longest = max((len(hits) for hits in hits_per_query), default=0)
    return [hits[rank] for rank in range(longest) for hits in hits_per_query if rank < len(hits)]


def collect(
    hits_per_query: Sequence[Sequence[SearchHit]], blocked: Iterable[str]
) -> tuple[list[CandidateSource], int, int]:
    """Unique, allowed candidates in rank order; how many duplicates and blocked were dropped."""
    blocked = tuple(blocked)
    found: dict[str, CandidateSource] = {}
    duplicates = dropped_blocked = 0
    for hit in _interleaved(hits_per_query):
        if not hit.url.startswith(("http://", "https://")):
            continue
        domain = domain_of(hit.url)
        if not domain or is_blocked(domain, blocked):
            dropped_blocked += 1
            continue
        key = normalise_url(hit.url)
        candidate = found.get(key)
        if candidate is None:
            found[key] = CandidateSource(hit.url, hit.title or domain, domain, [])
            candidate = found[key]
        else:
            duplicates += 1
        if hit.snippet and hit.snippet not in candidate.snippets:
            candidate.snippets.append(hit.snippet)
    return list(found.values()), duplicates, dropped_blocked


def prefer_distinct_domains(
    candidates: Sequence[CandidateSource], limit: int = MAX_SOURCES
) -> list[CandidateSource]:
    """Up to ``limit`` candidates: one per domain first, then a second each, in rank order."""
    chosen: list[CandidateSource] = []
    per_domain: dict[str, int] = {}
    for round_number in range(1, MAX_PER_DOMAIN + 1):
        for candidate in candidates:
            if len(chosen) == limit:
                return chosen
            if candidate in chosen or per_domain.get(candidate.domain, 0) >= round_number:
                continue
            per_domain[candidate.domain] = per_domain.get(candidate.domain, 0) + 1
            chosen.append(candidate)
    order = {id(c): i for i, c in enumerate(candidates)}
    return sorted(chosen, key=lambda c: order[id(c)])


def source_records(
    chosen: Sequence[CandidateSource], provider: str, retrieved_at: datetime | None = None
) -> list[dict[str, object]]:
    """The stored ``sources`` list: ``{id, url, title, snippets, provider, retrieved_at}``."""
    stamp = (retrieved_at or datetime.now(UTC)).isoformat(timespec="seconds")
    return [
        {
            "id": f"S{index}",
            "url": candidate.url,
            "title": candidate.title,
            "snippets": candidate.snippets[:MAX_SNIPPETS],
            "provider": provider,
            "retrieved_at": stamp,
        }
        for index, candidate in enumerate(chosen, start=1)
    ]
