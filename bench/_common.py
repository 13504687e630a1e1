"""What the benches share (not a bench: `make bench` runs every bench/*.py but this one).

running_stack(): a bench that measures the running stack (`make up`) checks that it answers and otherwise stops
with one line, "run `make up` first", instead of letting Prefect start a temporary server of its own. Prefect
reads its settings (PREFECT_API_URL ...) once, when it is imported, so a bench started without the stack's client
environment (`make bench` sets it; by hand, `source .trainyard/env`) runs itself again with it.

exit_on_sigterm(): SIGTERM stops a bench at once, after stopping what the bench itself started (servers, workers,
child processes) and the flow runs it triggered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import urllib.request
from collections.abc import Callable

from infra.settings import Settings

_RERUN = "TRAINYARD_BENCH_STACK_ENV"  # set when a bench ran itself again with the stack's environment


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def running_stack(bench: str, *, mlflow: bool = True) -> Settings:
    """The running stack's settings, with this process in its client environment; exits (status 1, one line on
    stderr) when the stack does not answer. Call it before the bench's first use of Prefect."""
    settings = Settings.from_env()
    env = settings.client_env()
    urls = [f"{env['PREFECT_API_URL']}/health"]
    if mlflow and env["MLFLOW_TRACKING_URI"].startswith("http"):
        urls.append(f"{env['MLFLOW_TRACKING_URI'].rstrip('/')}/health")
    down = [url for url in urls if not _answers(url)]
    if down:
        sys.exit(f"{bench}: run `make up` first (no answer from {', '.join(down)})")
    if any(os.environ.get(name) != value for name, value in env.items()):
        if os.environ.get(_RERUN):  # cannot happen: the environment below is the one compared
            sys.exit(f"{bench}: the stack's client environment did not apply; run it as `make bench` does")
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [sys.executable, *sys.orig_argv[1:]]
        os.execve(sys.executable, argv, {**os.environ, **env, _RERUN: "1"})
    return settings


def require_deployment(bench: str, name: str) -> None:
    """Exits with one line when the deployment `flow/name` is not on the server (`make deploy` applies them)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            sys.exit(f"{bench}: deployment {name} not found; run `make deploy` first")


def exit_on_sigterm(cleanup: Callable[[], None] | None = None) -> None:
    """On SIGTERM: `cleanup()` (its errors ignored), then exit with status 143 at once, whatever threads still run.

    A Prefect flow running in this process's main thread swaps the handler out while it runs; on SIGTERM it marks
    its run Crashed, puts this handler back and sends the signal again, so the cleanup still runs. A process forked
    from this one inherits the handler but only exits: the cleanup belongs to the process that installed it."""
    owner = os.getpid()

    def handler(signum, frame) -> None:
        if os.getpid() == owner and cleanup is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
            with contextlib.suppress(BaseException):
                cleanup()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)
