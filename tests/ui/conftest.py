"""Headless Chromium (Debian's `chromium` package) for tests that look at the Prefect UI as a person would."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.settings import ROOT

# Flags verified on these machines (shared/NOTES-stack.md); without a virtual-time budget the single-page app has
# not rendered yet when the page is captured.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
BUDGET_MS = (10_000, 30_000)  # a second, longer try when the first capture lacks what the test looks for

Browse = Callable[..., str]
SHOTS = pytest.StashKey[list]()  # every screenshot this session took


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("chromium not installed: apt-get install -y chromium")
    return path


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where screenshots are kept: $TRAINYARD_TEST_OUTPUT/ui, or test-output/ui in the repository (git-ignored)."""
    directory = Path(os.environ.get("TRAINYARD_TEST_OUTPUT", ROOT / "test-output")) / "ui"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browse(chromium: str, screenshots: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Browse:
    """browse(url, name, expect=[...]): the page as rendered (its DOM, HTML entities decoded), with a screenshot
    saved as <screenshots>/<name>.png. Looks twice, the second time longer, until every `expect` text is there."""

    def render(url: str, name: str, expect: tuple[str, ...] = ()) -> str:
        shot = screenshots / f"{name}.png"
        for budget in BUDGET_MS:
            command = [
                chromium,
                *FLAGS,
                f"--user-data-dir={tmp_path / 'chromium'}",
                f"--virtual-time-budget={budget}",
                f"--screenshot={shot}",
                "--dump-dom",
                url,
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            dom = html.unescape(done.stdout)
            if all(text in dom for text in expect):
                break
        request.config.stash.setdefault(SHOTS, []).append(shot)
        return dom

    return render


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    shots = config.stash.get(SHOTS, [])
    if shots:
        terminalreporter.write_line(f"UI screenshots ({len(shots)}): {shots[0].parent}")
