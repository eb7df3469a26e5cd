"""The `hub` fixture: a started tests.hubserver.HubServer, stopped after the test.

Registered in tests/conftest.py by import, so any test can ask for `hub`. See tests/hubserver.py for its API.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hubserver import HubServer


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server
