"""The SSRF guard for callback URLs: only public addresses, unless allow-listed.

Checked twice: when a job is submitted (``check_callback_url``) and when a webhook is
sent (``resolve_target``), against the very address the sender then connects to, so a
DNS answer that changes between the two (DNS rebinding) cannot reach our network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
AsyncResolver = Callable[[str, int], Awaitable[Sequence[str]]]

METADATA_ADDRESS: Final = ipaddress.IPv4Address("169.254.169.254")
_CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class BlockedDestination(ValueError):
    """A callback URL is refused; the message says why, for a 422 or an attempt log."""


@dataclass(frozen=True)
class AllowList:
    """Exceptions to the guard: hostnames (``*.example.com`` matches subdomains) and CIDRs."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[str]) -> AllowList:
        """Read ``WEBHOOK_ALLOWED_HOSTS`` entries (hostnames, IPs and CIDRs)."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host in self.hosts:
            return True
        return any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class ResolvedTarget:
    """Where a webhook goes: the URL as given, and the checked addresses to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        """``Host`` as the URL names it (the port only when not the scheme's default)."""
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if _DEFAULT_PORTS.get(self.scheme) == self.port else f"{name}:{self.port}"

    def url_for(self, address: str) -> str:
        """The URL with its host replaced by ``address``, so no second DNS lookup happens."""
        parts = urlsplit(self.url)
        literal = f"[{address}]" if ":" in address else address
        return urlunsplit(parts._replace(netloc=f"{literal}:{self.port}"))


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` must not be called back (``None`` for a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or _nat64(address) or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            inner = address_problem(embedded)
            if inner:
                return f"an IPv6 address embedding {embedded}, which is {inner}"
    if address == METADATA_ADDRESS:
        return "the cloud metadata server (link-local)"
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a publicly routable address"
    return None


def needs_lookup(url: str, *, allow_http: bool, allowed_hosts: Sequence[str]) -> bool:
    """The part of ``check_callback_url`` that needs no DNS: the URL's form, the
    allow-list and an address written in the URL. Raise ValueError as it does; True when
    the host is a name still to be resolved and checked."""
    _, host, _ = _split(url, allow_http=allow_http)
    allow = AllowList.parse(allowed_hosts)
    if allow.allows_host(host):
        return False
    literal = _literal(host)
    if literal is not None:
        _check_addresses(host, [literal], allow)
        return False
    return True


def check_callback_url(
    url: str,
    *,
    allow_http: bool,
    allowed_hosts: Sequence[str],
    resolver: Resolver | None = None,
) -> None:
    """Refuse a callback URL that is not https (unless ``allow_http``) or that names or
    resolves to a non-public address, unless allow-listed; raise ValueError saying why.

    It resolves the host (blocking); call it through ``asyncio.to_thread`` from async code,
    when ``needs_lookup`` says a lookup is left to do.
    """
    if not needs_lookup(url, allow_http=allow_http, allowed_hosts=allowed_hosts):
        return
    _, host, port = _split(url, allow_http=allow_http)
    allow = AllowList.parse(allowed_hosts)
    try:
        answers = (resolver or _system_resolver)(host, port)
    except OSError as exc:
        raise BlockedDestination(f"callback_url host {host!r} does not resolve: {exc}") from exc
    _check_addresses(host, _parse_answers(host, answers), allow)


async def resolve_target(
    url: str,
    *,
    allow_http: bool,
    allowed_hosts: Sequence[str] | AllowList,
    resolver: AsyncResolver | None = None,
) -> ResolvedTarget:
    """Resolve ``url`` once and check every address; connect only to what this returns.

    Raises BlockedDestination for a refused URL and OSError when the name does not resolve.
    """
    scheme, host, port = _split(url, allow_http=allow_http)
    allow = (
        allowed_hosts if isinstance(allowed_hosts, AllowList) else AllowList.parse(allowed_hosts)
    )
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        answers = await (resolver or _async_system_resolver)(host, port)
        addresses = _parse_answers(host, answers)
    if not addresses:
        raise OSError(f"{host} has no addresses")
    if not allow.allows_host(host):
        _check_addresses(host, addresses, allow)
    return ResolvedTarget(url, scheme, host, port, tuple(str(a) for a in addresses))


def _split(url: str, *, allow_http: bool) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BlockedDestination(f"callback_url is not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BlockedDestination("callback_url must be an http(s) URL")
    if scheme == "http" and not allow_http:
        raise BlockedDestination("callback_url must use https (http is not allowed here)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BlockedDestination("callback_url has no host")
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _parse_answers(host: str, answers: Sequence[str]) -> list[IPAddress]:
    addresses = []
    for answer in answers:
        try:
            addresses.append(ipaddress.ip_address(answer.split("%", 1)[0]))
        except ValueError as exc:
            raise BlockedDestination(f"{host} resolved to an unusable address {answer!r}") from exc
    if not addresses:
        raise BlockedDestination(f"callback_url host {host!r} does not resolve")
    return addresses


def _check_addresses(host: str, addresses: Sequence[IPAddress], allow: AllowList) -> None:
    for address in addresses:
        if allow.allows_address(address):
            continue
        problem = address_problem(address)
        if problem:
            shown = host if str(address) == host else f"{host} (resolves to {address})"
            raise BlockedDestination(
                f"callback_url {shown} is {problem}; callbacks must go to public addresses"
            )


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _async_system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
