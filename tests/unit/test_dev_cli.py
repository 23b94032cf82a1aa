"""``blogpipe dev`` flags, the API's socket, and the port the replicas share."""

from __future__ import annotations

import socket

import pytest

from blogpipe.cli import main
from blogpipe.runtime import api_socket
from core.errors import ConfigError


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dev", "--replicas", "0"], "--replicas must be between 1 and 64"),
        (["dev", "--replicas", "65"], "--replicas must be between 1 and 64"),
        (["dev", "--workers", "-1"], "--workers must be between 0 and 64"),
        (["dev", "--workers", "2", "--replicas", "2"], "--workers and --replicas cannot be"),
    ],
)
def test_bad_process_counts_are_refused_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_replicas_bind_one_port_and_others_cannot_take_it_unasked() -> None:
    first = api_socket("127.0.0.1", 0, shared=True)
    port = first.getsockname()[1]
    second = api_socket("127.0.0.1", port, shared=True)
    plain = socket.socket()
    try:
        assert second.getsockname()[1] == port
        # A process that did not ask to share the port (no SO_REUSEPORT) is refused it.
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        for sock in (first, second, plain):
            sock.close()


def test_a_port_in_use_or_an_address_not_here_is_a_config_error_naming_the_settings() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port} .*set PORT \(or HOST\)"):
            api_socket("127.0.0.1", port)
        # 192.0.2.1 is a documentation address (TEST-NET-1), never one of this machine's.
        with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1:"):
            api_socket("192.0.2.1", port)
    finally:
        taken.close()


def test_the_api_socket_is_bound_but_not_listening_until_served() -> None:
    sock = api_socket("127.0.0.1", 0)
    try:
        # Until the server listens, a client is refused rather than left waiting.
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(sock.getsockname())
    finally:
        sock.close()
