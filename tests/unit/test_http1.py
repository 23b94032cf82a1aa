"""The notifier's HTTP/1.1 client against scripted loopback servers: keep-alive and its
limits, interim and chunked answers, broken answers, and TLS with the server name checked."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notifier.http1 import MAX_DRAIN_BYTES, ConnectFailed, Http1Client, ProtocolError
from tests.support.waiting import wait_for

TIMEOUT = 10

Answer = Callable[[int], bytes]
"""The raw bytes to answer the n-th request (from 0) of the whole server."""


class Server:
    """Reads requests (head and content-length body) and writes scripted answers."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                n = len(self.requests)
                self.requests.append((head, body))
                writer.write(self.answer(n))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def ok(body: bytes = b"ok", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def post(client: Http1Client, server: Server, body: bytes = b"{}", **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "scheme": "http",
        "address": "127.0.0.1",
        "port": server.port,
        "host": "hooks.example.test",
        "host_header": "hooks.example.test",
        "target": "/hook?x=1",
        "body": body,
        "headers": {"content-type": "application/json", "webhook-id": "msg_1"},
        "excerpt_limit": 2048,
    }
    args.update(kw)
    return await asyncio.wait_for(client.post(**args), TIMEOUT)  # type: ignore[arg-type]


async def test_posts_reuse_one_connection_with_the_urls_host_and_body() -> None:
    client = Http1Client()
    async with serving(Server(lambda n: ok(f"answer {n}".encode()))) as server:
        first = await post(client, server, b'{"a": 1}')
        second = await post(client, server, b'{"b": 22}')
    await client.aclose()
    assert (first.status_code, first.body, second.body) == (200, b"answer 0", b"answer 1")
    assert server.connections == 1 and client.connections_opened == 1
    head, body = server.requests[1]
    assert head.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert b"\r\nhost: hooks.example.test\r\n" in head
    assert b"\r\ncontent-length: 9\r\n" in head and b"\r\nwebhook-id: msg_1\r\n" in head
    assert body == b'{"b": 22}'


async def test_as_many_idle_connections_are_kept_as_asked() -> None:
    client = Http1Client(max_idle_per_host=2)
    async with serving(Server(lambda n: ok())) as server:
        # Four at once need four connections; two of them are kept afterwards.
        await asyncio.wait_for(asyncio.gather(*(post(client, server) for _ in range(4))), TIMEOUT)
        assert client.connections_opened == 4
        await asyncio.wait_for(asyncio.gather(*(post(client, server) for _ in range(4))), TIMEOUT)
    await client.aclose()
    assert client.connections_opened == 6 and server.connections == 6


async def test_a_kept_connection_the_server_closed_is_replaced() -> None:
    client = Http1Client()
    async with serving(Server(lambda n: ok(), close_after=True)) as server:
        await post(client, server)

        async def closed() -> bool:  # the kept connection has seen the server's close
            return not any(conn.usable() for pool in client._idle.values() for conn in pool)

        await wait_for(closed, timeout=TIMEOUT, interval=0.01, message="the server's close")
        again = await post(client, server)
    await client.aclose()
    assert again.status_code == 200
    assert server.connections == 2 and len(server.requests) == 2


async def test_connection_close_and_an_endless_body_are_not_reused() -> None:
    client = Http1Client()
    big = b"x" * (MAX_DRAIN_BYTES + 1)
    answers = [ok(extra="connection: close\r\n"), ok(big), ok()]
    async with serving(Server(lambda n: answers[n])) as server:
        closing = await post(client, server)
        long = await post(client, server, excerpt_limit=10)
        last = await post(client, server)
    await client.aclose()
    assert closing.status_code == 200 and long.body == b"x" * 10 and last.status_code == 200
    assert client.connections_opened == 3


async def test_interim_and_chunked_answers() -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nslow \r\n6;ext=1\r\ndown!!\r\n0\r\ntrailer: yes\r\n\r\n"
    )
    client = Http1Client()
    async with serving(Server(lambda n: chunked if n == 0 else ok())) as server:
        first = await post(client, server)
        second = await post(client, server)
    await client.aclose()
    assert (first.status_code, first.body) == (429, b"slow down!!")
    assert first.headers["retry-after"] == "7"
    assert second.status_code == 200 and client.connections_opened == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "ended inside its body"),
        (b"HTTP/1.1 200 OK\r\nx: " + b"y" * 70_000 + b"\r\n\r\n", "response headers over"),
    ],
)
async def test_broken_answers_are_protocol_errors(answer: bytes, message: str) -> None:
    client = Http1Client()
    async with serving(Server(lambda n: answer, close_after=True)) as server:
        with pytest.raises(ProtocolError, match=message):
            await post(client, server)
    await client.aclose()


async def test_a_refused_connection_and_a_header_with_a_line_break() -> None:
    client = Http1Client()
    server = Server(lambda n: ok())
    async with serving(server):
        port = server.port
    with pytest.raises(ConnectFailed):
        await post(client, server, port=port)
    async with serving(Server(lambda n: ok())) as live:
        with pytest.raises(ValueError, match="line break"):
            await post(client, live, headers={"x-evil": "a\r\nhost: elsewhere"})
        assert live.requests == []
    await client.aclose()


def _certificate(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for ``name``: the server's context and a client trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_checks_the_certificate_against_the_urls_host(tmp_path: Path) -> None:
    server_tls, client_tls = _certificate(tmp_path, "hooks.example.test")
    client = Http1Client(tls=client_tls)
    async with serving(Server(lambda n: ok(b"secure")), tls=server_tls) as server:
        answer = await post(client, server, scheme="https")
        with pytest.raises(ConnectFailed, match="TLS handshake failed"):
            await post(client, server, scheme="https", host="evil.example.test", host_header="x")
    await client.aclose()
    assert (answer.status_code, answer.body) == (200, b"secure")
    untrusting = Http1Client(tls=ssl.create_default_context())
    async with serving(Server(lambda n: ok()), tls=server_tls) as server:
        with pytest.raises(ConnectFailed, match="TLS handshake failed"):
            await post(untrusting, server, scheme="https")
    await untrusting.aclose()
