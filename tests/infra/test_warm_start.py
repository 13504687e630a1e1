"""The warm-start launcher and server (infra/runs/warm_start.py), with a small module standing in for Prefect's engine:
what the run sees (environment, working directory, stdio), its exit status, signals both ways, and reloading."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from infra.runs import warm_start
from infra.settings import ROOT

CHILD = """
import json, os, signal, sys, time
mode = sys.argv[1]
if mode == "report":
    probe = sys.modules.get("warm_probe")  # preloaded by the server of the warm_up hook test
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                      "warm_up_calls": getattr(probe, "calls", None)}))
    sys.exit(int(sys.argv[2]))
def stop(signum, frame):
    open("stopped", "w").write(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open("started", "w").write(str(os.getpid()))
time.sleep(60)
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "child.py").write_text(CHILD)
    return tmp_path


@pytest.fixture
def server(tmp_path: Path):
    """A warm-start server that preloads nothing heavy (json), so each test starts it in a fraction of a second."""
    sock = tmp_path / "warm.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.runs.warm_start", "serve", "--socket", str(sock), "--preload", "json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    _wait_for_line(process, "listening")
    yield sock, process
    process.kill()
    process.wait()


def _wait_for_line(process: subprocess.Popen, text: str) -> None:
    while line := process.stdout.readline():
        if text in line:
            return
    raise AssertionError(f"the warm-start server exited before printing {text!r}")


def _launch(workdir: Path, sock: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "TRAINYARD_WARM_SOCKET": str(sock), "PROBE": "from-the-launcher"}
    argv = [sys.executable, "-m", "infra.runs.warm_start", "--module", "child", *args]
    return subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True, **popen)


def _report(launcher: subprocess.Popen) -> dict:
    out, _ = launcher.communicate(timeout=30)
    return json.loads(out)


def _wait_for_file(path: Path, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout} s")


def test_without_a_server_the_launcher_runs_the_cold_command_as_its_child(workdir):
    launcher = _launch(workdir, workdir / "nobody-listens.sock", "report", "3")
    report = _report(launcher)
    assert launcher.returncode == 3
    assert report["ppid"] == launcher.pid  # the launcher stays, to vouch for the run while it lives
    assert report["probe"] == "from-the-launcher"


def test_without_a_server_signals_reach_the_run_and_a_killed_launcher_takes_it_along(workdir):
    launcher = _launch(workdir, workdir / "nobody-listens.sock", "wait")
    _wait_for_file(workdir / "started")
    launcher.send_signal(signal.SIGTERM)  # what a worker sends to cancel
    assert launcher.wait(timeout=15) == 143
    assert _wait_for_file(workdir / "stopped") == str(int(signal.SIGTERM))

    (workdir / "started").unlink()
    launcher = _launch(workdir, workdir / "nobody-listens.sock", "wait")
    child = int(_wait_for_file(workdir / "started"))
    launcher.kill()  # what a worker does when a cancelled run outlives its grace period
    launcher.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_a_warm_run_is_forked_by_the_server_with_the_launchers_environment_and_stdio(workdir, server):
    sock, process = server
    launcher = _launch(workdir, sock, "report", "3")
    report = _report(launcher)  # the child's stdout is the launcher's
    assert report["ppid"] == process.pid
    assert report["probe"] == "from-the-launcher"
    assert Path(report["cwd"]) == workdir
    assert launcher.returncode == 3  # the child's exit status is the launcher's


def test_sigterm_to_the_launcher_reaches_the_run(workdir, server):
    sock, _ = server
    launcher = _launch(workdir, sock, "wait")
    _wait_for_file(workdir / "started")
    launcher.send_signal(signal.SIGTERM)  # what a worker sends to cancel
    assert launcher.wait(timeout=15) == 143
    assert _wait_for_file(workdir / "stopped") == str(int(signal.SIGTERM))


def test_a_run_killed_by_a_signal_kills_its_launcher_with_the_same_signal(workdir, server):
    sock, _ = server
    launcher = _launch(workdir, sock, "wait")
    child = int(_wait_for_file(workdir / "started"))
    os.kill(child, signal.SIGKILL)
    assert launcher.wait(timeout=15) == -signal.SIGKILL  # the worker sees what it would have seen cold


def test_a_launcher_killed_with_sigkill_takes_its_run_with_it(workdir, server):
    sock, _ = server
    launcher = _launch(workdir, sock, "wait")
    child = int(_wait_for_file(workdir / "started"))
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(child), "the run outlived the launcher its worker watches"


def test_a_changed_source_file_is_never_run_stale(workdir, server):
    sock, process = server
    watched = ROOT / "infra" / "settings.py"  # imported by the server, so part of what it preloaded
    stat = watched.stat()
    os.utime(watched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        report = _report(_launch(workdir, sock, "report", "0"))
        assert report["ppid"] != process.pid  # answered "cold": run by a fresh interpreter
        _wait_for_line(process, "listening")  # the server re-executed itself with fresh imports, same pid
        assert process.poll() is None
        assert _report(_launch(workdir, sock, "report", "0"))["ppid"] == process.pid
    finally:
        os.utime(watched, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_probes_and_stray_connections_do_not_disturb_the_server(workdir, server):
    sock, process = server
    assert warm_start.ready(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stray:
        stray.connect(str(sock))
        stray.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert _report(_launch(workdir, sock, "report", "0"))["ppid"] == process.pid
    assert not warm_start.ready(workdir / "nobody-listens.sock")


def test_the_server_runs_the_preloaded_modules_warm_up_hooks_once_for_every_run(workdir, tmp_path):
    """A preloaded module's `warm_up()` (hf-image builds Transformers' conversion table there) runs once in the
    server, and the runs it forks find its work done."""
    (tmp_path / "warm_probe.py").write_text("calls = 0\ndef warm_up():\n    global calls\n    calls += 1\n")
    sock = tmp_path / "hooks.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    argv = [
        sys.executable,
        "-m",
        "infra.runs.warm_start",
        "serve",
        "--socket",
        str(sock),
        "--preload",
        "json,warm_probe",
    ]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        _wait_for_line(process, "listening")
        reports = [_report(_launch(workdir, sock, "report", "0")) for _ in range(2)]
    finally:
        process.kill()
        process.wait()
    assert [r["warm_up_calls"] for r in reports] == [1, 1]
