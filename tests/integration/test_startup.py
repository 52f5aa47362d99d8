"""The command-line start-up: a local Prefect API booted before the imports, then used."""

from __future__ import annotations

import urllib.request

import pytest

from flows.startup import ApiStart

pytestmark = pytest.mark.slow


def test_api_start_boots_a_server_that_the_flow_settings_point_at(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api = ApiStart().start()
    try:
        assert api.process is not None
        # as a command line sees it: no API configured (a test harness may have set one)
        with temporary_settings(restore_defaults={PREFECT_API_URL}), api.settings():
            assert PREFECT_API_URL.value() == api.api_url
            with urllib.request.urlopen(f"{api.api_url}/health", timeout=5) as response:
                assert response.status == 200
        process = api.process
    finally:
        api.stop()
    assert process.poll() is not None  # stopped with the command
    assert api.process is None


def test_api_start_leaves_a_configured_api_alone(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    api = ApiStart().start()
    assert api.process is None
