"""Fixtures for the infra tests that talk to the real Prefect server of the session."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def client(stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture
def unique() -> str:
    """A name no other test uses: pools, flows and blocks on the shared server never clash."""
    return f"ty-test-{uuid.uuid4().hex[:8]}"
