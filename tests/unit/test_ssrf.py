"""The SSRF guard: every refused range, resolution, allow-list, and the delivery-time check."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from core.ssrf import AllowList, BlockedDestination, check_callback_url, resolve_target

REFUSED = {
    "loopback": "127.0.0.1",
    "loopback elsewhere in 127/8": "127.5.6.7",
    "10/8": "10.1.2.3",
    "172.16/12": "172.20.0.1",
    "192.168/16": "192.168.1.10",
    "link-local": "169.254.10.20",
    "metadata server": "169.254.169.254",
    "CGNAT": "100.64.1.1",
    "multicast": "224.0.0.1",
    "reserved": "240.0.0.1",
    "broadcast": "255.255.255.255",
    "unspecified": "0.0.0.0",
    "this network": "0.1.2.3",
    "IPv6 loopback": "::1",
    "IPv6 unspecified": "::",
    "IPv6 unique local": "fc00::1",
    "IPv6 unique local fd": "fd12:3456::1",
    "IPv6 link-local": "fe80::1",
    "IPv6 multicast": "ff02::1",
    "IPv4-mapped loopback": "::ffff:127.0.0.1",
    "IPv4-mapped private": "::ffff:10.0.0.1",
    "IPv4-mapped metadata": "::ffff:169.254.169.254",
    "NAT64 of private": "64:ff9b::a00:1",
    "6to4 of private": "2002:a00:1::1",
}


def fixed(*answers: str) -> object:
    def resolver(host: str, port: int) -> Sequence[str]:
        return answers

    return resolver


def check(
    url: str, *, allow_http: bool = False, allowed: Sequence[str] = (), resolver: object = None
) -> None:
    check_callback_url(
        url,
        allow_http=allow_http,
        allowed_hosts=allowed,
        resolver=resolver or fixed("93.184.216.34"),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("address", REFUSED.values(), ids=REFUSED.keys())
def test_literal_non_public_addresses_are_refused(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(ValueError, match="public addresses"):
        check(f"https://{host}/hook")


@pytest.mark.parametrize("address", REFUSED.values(), ids=REFUSED.keys())
def test_hostnames_resolving_to_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="resolves to"):
        check("https://hooks.example.com/hook", resolver=fixed(address))


def test_hostname_resolving_to_127_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError) as info:
        check("https://evil.example.com/hook", resolver=fixed("127.0.0.1"))
    assert str(info.value) == (
        "callback_url evil.example.com (resolves to 127.0.0.1) is a loopback address;"
        " callbacks must go to public addresses"
    )


def test_any_private_answer_among_several_refuses() -> None:
    with pytest.raises(ValueError, match="private"):
        check("https://hooks.example.com/", resolver=fixed("93.184.216.34", "10.0.0.5"))


def test_public_https_is_accepted() -> None:
    check("https://hooks.example.com/hook")
    check("https://93.184.216.34:8443/hook")
    check("https://[2606:4700::1111]/hook")


def test_http_needs_the_setting() -> None:
    with pytest.raises(ValueError, match="https"):
        check("http://hooks.example.com/hook")
    check("http://hooks.example.com/hook", allow_http=True)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "https:///nohost", "https://[::1/x"])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check(url)


def test_unresolvable_host_is_refused() -> None:
    def failing(host: str, port: int) -> Sequence[str]:
        raise OSError("Name or service not known")

    with pytest.raises(ValueError, match="does not resolve"):
        check("https://nowhere.invalid/", resolver=failing)


def test_allow_list_opens_cidrs_and_hostnames() -> None:
    check("http://127.0.0.1:8000/hook", allow_http=True, allowed=["127.0.0.0/8"])
    check("http://[::1]:8000/hook", allow_http=True, allowed=["::1"])
    check(
        "https://internal.example.com/",
        allowed=["internal.example.com"],
        resolver=fixed("10.0.0.1"),
    )
    check("https://a.corp.example/", allowed=["*.corp.example"], resolver=fixed("10.0.0.1"))
    check("https://hooks.example.com/", allowed=["10.0.0.0/8"], resolver=fixed("10.9.9.9"))
    with pytest.raises(ValueError):
        check("https://hooks.example.com/", allowed=["10.0.0.0/8"], resolver=fixed("192.168.0.1"))


def test_allow_list_parsing() -> None:
    allow = AllowList.parse(["127.0.0.1", " Localhost. ", "10.0.0.0/8", "[::1]", ""])
    assert allow.hosts == frozenset({"localhost"})
    assert [str(n) for n in allow.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]


def test_delivery_time_check_defeats_dns_rebinding() -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> Sequence[str]:
        return next(answers)

    async def rebinding_async(host: str, port: int) -> Sequence[str]:
        return rebinding(host, port)

    url = "https://rebind.example.com/hook"
    check_callback_url(url, allow_http=False, allowed_hosts=(), resolver=rebinding)  # passes
    with pytest.raises(BlockedDestination, match="loopback"):
        asyncio.run(
            resolve_target(url, allow_http=False, allowed_hosts=(), resolver=rebinding_async)
        )


def test_resolved_target_connects_to_the_checked_address() -> None:
    async def resolver(host: str, port: int) -> Sequence[str]:
        return ["93.184.216.34", "2606:2800::1"]

    target = asyncio.run(
        resolve_target(
            "https://hooks.example.com:8443/a/b?x=1",
            allow_http=False,
            allowed_hosts=(),
            resolver=resolver,
        )
    )
    assert target.addresses == ("93.184.216.34", "2606:2800::1")
    assert target.url_for("93.184.216.34") == "https://93.184.216.34:8443/a/b?x=1"
    assert target.url_for("2606:2800::1") == "https://[2606:2800::1]:8443/a/b?x=1"
    assert target.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize(
    ("url", "allowed", "lookup"),
    [
        ("https://93.184.216.34/hook", (), False),
        ("https://[2606:2800:220:1::1]/hook", (), False),
        ("http://127.0.0.1:8080/hook", ("127.0.0.1",), False),
        ("https://hooks.example.com/x", ("hooks.example.com",), False),
        ("https://hooks.example.com/x", (), True),
    ],
)
def test_what_needs_no_lookup_is_decided_without_one(
    url: str, allowed: tuple[str, ...], lookup: bool
) -> None:
    from core.ssrf import needs_lookup

    assert needs_lookup(url, allow_http=True, allowed_hosts=allowed) is lookup


@pytest.mark.parametrize(
    "url", ["https://10.1.2.3/hook", "https://[::1]/hook", "ftp://93.184.216.34/", "http://x/"]
)
def test_what_needs_no_lookup_is_refused_without_one(url: str) -> None:
    from core.ssrf import needs_lookup

    with pytest.raises(ValueError):
        needs_lookup(url, allow_http=False, allowed_hosts=())
