"""Fixtures that start the Google emulators on free ports.

Each emulator's fixture lives in its own module; a missing emulator skips its tests
with a reason, unless ``BLOGPIPE_REQUIRE_EMULATORS=1`` (CI), where it fails them.
"""

from __future__ import annotations

import os

import pytest


def emulators_required() -> bool:
    """True when CI demands the emulators (``BLOGPIPE_REQUIRE_EMULATORS=1``)."""
    return os.environ.get("BLOGPIPE_REQUIRE_EMULATORS", "") in ("1", "true", "yes")


def missing_emulator(reason: str) -> None:
    """Skip the test, or fail it when emulators are required."""
    if emulators_required():
        pytest.fail(f"{reason} (BLOGPIPE_REQUIRE_EMULATORS=1)", pytrace=False)
    pytest.skip(reason)
