"""``blogpipe dev`` flags and the port the replicas share."""

from __future__ import annotations

import socket

import pytest

from blogpipe.cli import main
from blogpipe.runtime import shared_port_socket


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
    first = shared_port_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = shared_port_socket("127.0.0.1", port)
    plain = socket.socket()
    try:
        assert second.getsockname()[1] == port
        # A process that did not ask to share the port (no SO_REUSEPORT) is refused it.
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        for sock in (first, second, plain):
            sock.close()
