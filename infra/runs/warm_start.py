"""Warm start for flow runs on a process worker: a server that has already imported Prefect, torch, MLflow and the
flows forks each run's engine, so a triggered run starts in milliseconds instead of seconds.

A process worker starts `python -m prefect.engine` for every flow run: a new interpreter that imports Prefect, the
flow and torch (about 6 s on a 2-core machine, twice that with Prefect's workspace supervisor). Trainyard's
process pools set the job command to this module instead. The launcher is stdlib only:

    python -m infra.runs.warm_start            # the job command: run this flow run's engine, warm when possible
    python -m infra.runs.warm_start serve      # the server (`make up` starts it next to the worker)

The launcher hands its environment, working directory and stdio to the server, which forks a child that runs
`prefect.engine` exactly as the cold command would. Without a server (TRAINYARD_WARM_SOCKET unset or nobody
listening) it starts the cold command as its child, so a pool using it never depends on the server. Either way
the launcher stays the process the worker watches: it forwards signals (cancellation is SIGTERM) to the child,
vouches for the run while the child lives (infra/runs/liveness.py: the run's heartbeats come from here, not from the
busy training process) and exits with the child's status.

The server preloads modules once; when a preloaded file of this repository changes, it answers "cold" and
restarts itself, so a run never executes stale code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time

SOCKET_ENV = "TRAINYARD_WARM_SOCKET"
# What a training run would import anyway; nothing here may start a thread or touch CUDA (a fork keeps neither).
PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "flows.train",
    "flows.train_step",
    "trainers.torch_classifier",
    "trainers.hf_image",
    "trainers.yolo",
    "mlflow.onnx",
    "onnxruntime",
)
ENGINE = "prefect.engine"  # what runs; `--module NAME` first in the arguments runs another module the same way
MAX_REQUEST = 1 << 24  # an environment, a directory and some arguments
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


# --- the launcher (the job command; stdlib only, it starts in ~30 ms) --------------------------------------------


def launch(argv: list[str]) -> int:
    path = os.environ.get(SOCKET_ENV)
    conn = _connect(path) if path else None
    if conn is None:
        return _cold(argv)
    request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": argv}).encode()
    with conn:
        try:
            socket.send_fds(conn, [struct.pack("!Q", len(request))], [0, 1, 2])
            conn.sendall(request)
            reader = conn.makefile("r")
            answer = reader.readline().split()
        except OSError:  # the server went away mid-request
            answer = []
        if answer[:1] != ["pid"]:  # "cold": the server is reloading changed code, or could not fork
            conn.close()
            return _cold(argv)
        child = int(answer[1])
        _forward_signals(child)
        with _vouching(child) as ended:
            line = reader.readline().split()
            if line[:1] == ["exit"]:
                ended.code = int(line[1])
            else:
                while _alive(child):  # the server died: wait for the run itself, status unknown
                    time.sleep(1)
    return _exit_like(ended.code)


@contextlib.contextmanager
def _vouching(child: int):
    """Vouch for this job's run (PREFECT__FLOW_RUN_ID) while `child` runs it (infra/runs/liveness.py). The block sets
    the child's exit status on what it yields; the voucher reports it when the block ends."""
    import types

    from infra.runs.liveness import PrefectAPI, Voucher

    run, api, ended = os.environ.get("PREFECT__FLOW_RUN_ID"), PrefectAPI.from_env(), types.SimpleNamespace(code=1)
    voucher = Voucher(api, run, child).start() if run and api else None
    try:
        yield ended
    finally:
        if voucher is not None:
            voucher.close(ended.code)


def _forward_signals(child: int) -> None:
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, _frame: _forward(child, signum))


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        return conn
    except OSError:
        conn.close()
        return None


def _cold(argv: list[str]) -> int:
    """Start the command as a child in a process group of its own (the group a fence kills), and wait for it."""
    import subprocess

    module, args = _module(argv)
    child = subprocess.Popen([sys.executable, "-m", module, *args], start_new_session=True, preexec_fn=_die_with_parent)
    _forward_signals(child.pid)
    with _vouching(child.pid) as ended:
        ended.code = child.wait()
    return _exit_like(ended.code)


def _die_with_parent() -> None:
    """In the cold child: if the launcher is killed (SIGKILL after a cancel's grace), the run goes with it, as
    the warm server does for a forked run. Linux only; elsewhere the child outlives a killed launcher."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _module(argv: list[str]) -> tuple[str, list[str]]:
    return (argv[1], argv[2:]) if argv[:1] == ["--module"] and len(argv) > 1 else (ENGINE, argv)


def _forward(child: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _exit_like(code: int) -> int:
    """Exit as the child did: a child killed by a signal makes the launcher die of the same signal."""
    if code < 0:
        with contextlib.suppress(OSError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# --- the server --------------------------------------------------------------------------------------------------


def warm_up(modules: tuple[str, ...]) -> None:
    """Import `modules` and run the `warm_up()` of those that have one: one-time work every run would otherwise
    repeat (a library's lazily built tables). Like the imports, a hook may start no thread and touch no GPU."""
    import importlib

    for name in modules:
        hook = getattr(importlib.import_module(name), "warm_up", None)
        if callable(hook):
            hook()


def serve(path: str, preload: tuple[str, ...] = PRELOAD, adopt: dict[int, int] | None = None) -> None:
    """Preload, then fork one engine per launcher that connects. `adopt`: running children (pid -> launcher
    connection fd) handed over by the previous image of this server when it reloaded."""
    import selectors
    import threading

    started = time.monotonic()
    warm_up(preload)
    watched = _project_files()
    if threading.active_count() > 1:  # forking a threaded process copies locks held by threads that do not exist
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise SystemExit(f"warm start: preloading started threads ({names}); refusing to fork from this process")

    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd sees SIGCHLD
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `make down`: remove the socket on the way out
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    children: dict[int, socket.socket] = {}  # child pid -> its launcher's connection
    for pid, fd in (adopt or {}).items():
        children[pid] = socket.socket(fileno=fd)
        selector.register(children[pid], selectors.EVENT_READ, pid)
    _reap(children, selector)  # children that ended while this image was preloading
    server_pid = os.getpid()
    print(f"warm start: {len(preload)} modules preloaded in {time.monotonic() - started:.1f} s; listening on {path}")
    sys.stdout.flush()
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "accept":
                    conn, _ = listener.accept()
                    received = _read_request(conn)
                    if received is None:  # a readiness probe, or not a launcher
                        conn.close()
                        continue
                    if _changed(watched):
                        for fd in received[1]:
                            os.close(fd)
                        with contextlib.suppress(OSError):
                            conn.sendall(b"cold\n")
                        conn.close()
                        print("warm start: project files changed; reloading", flush=True)
                        _reexec(path, preload, children)
                    try:
                        pid = _fork_run(conn, *received, [listener, *children.values()], selector, (wake_r, wake_w))
                    except OSError as error:  # no fork (out of memory, process limit): this run starts cold
                        print(f"warm start: cannot fork ({error}); the launcher starts the run cold", flush=True)
                        conn.close()
                        continue
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                elif key.data == "reap":
                    os.read(wake_r, 4096)
                    _reap(children, selector)
                elif not _receive(key.fileobj):  # a launcher died (SIGKILL): its run must not go on alone
                    selector.unregister(key.fileobj)
                    _forward(key.data, signal.SIGKILL)
    finally:
        if os.getpid() == server_pid and os.path.exists(path):
            os.unlink(path)


def _receive(conn: socket.socket) -> bytes:
    try:
        return conn.recv(1)
    except OSError:
        return b""


def _read_request(conn: socket.socket) -> tuple[dict, list[int]] | None:
    conn.settimeout(5)  # a launcher sends everything at once; never let a stray client block the server
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        (length,) = struct.unpack("!Q", header)
        if length > MAX_REQUEST:
            raise ValueError("not a launcher's request")
        payload = b""
        while len(payload) < length and (chunk := conn.recv(min(length - len(payload), 1 << 16))):
            payload += chunk
        request = json.loads(payload)
        if len(fds) != 3 or not {"env", "cwd", "argv"} <= request.keys():
            raise ValueError("incomplete request")
    except (OSError, ValueError, struct.error):
        for fd in fds:
            os.close(fd)
        return None
    conn.settimeout(None)
    return request, fds


def ready(path: str | os.PathLike) -> bool:
    """Whether a server is listening on `path` (it takes an empty connection as a probe)."""
    conn = _connect(str(path))
    if conn:
        conn.close()
    return conn is not None


def _fork_run(
    conn: socket.socket, request: dict, fds: list[int], inherited: list[socket.socket], selector, wake: tuple[int, int]
) -> int:
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {pid}\n".encode())
        print(f"warm start: flow run {request['env'].get('PREFECT__FLOW_RUN_ID', '?')} forked as pid {pid}", flush=True)
        return pid
    # The child: become the cold command's process, then run the engine as `python -m prefect.engine` would.
    try:
        selector.close()
        for sock in [conn, *inherited]:  # the server's ends of other launchers' connections close with the server
            sock.close()
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]  # as `python -m` run there would have it
    except BaseException:
        import traceback

        traceback.print_exc()
        _exit(1)
    _run_module(request["argv"])
    raise AssertionError("not reached")


def _run_module(argv: list[str]) -> None:
    import runpy

    if "prefect.context" in sys.modules:  # Prefect read its settings at import, from the server's environment
        sys.modules["prefect.context"].refresh_global_settings_context()
    module, args = _module(argv)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    else:
        code = 0
    _exit(code)


def _exit(code: int) -> None:
    # A normal interpreter exit (atexit: Prefect flushes its logs and events), then never back into the server loop.
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(children: dict[int, socket.socket], selector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            if _registered(selector, conn):
                selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def _project_files() -> dict[str, float]:
    from infra.settings import ROOT

    root = str(ROOT)
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(root) and "/.venv/" not in path and os.path.exists(path):
            files[path] = os.stat(path).st_mtime
    return files


def _changed(watched: dict[str, float]) -> bool:
    for path, mtime in watched.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return True
        except FileNotFoundError:
            return True
    return False


def _registered(selector, conn: socket.socket) -> bool:
    try:
        selector.get_key(conn)
        return True
    except KeyError:
        return False


def _reexec(path: str, preload: tuple[str, ...], children: dict[int, socket.socket]) -> None:
    """Replace this image with a fresh one. The pid stays, so running children stay ours; their launchers'
    connections are inherited and adopted by the new image."""
    for conn in children.values():
        os.set_inheritable(conn.fileno(), True)
    adopt = ",".join(f"{pid}:{conn.fileno()}" for pid, conn in children.items())
    preload = ",".join(preload)
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "infra.runs.warm_start",
            "serve",
            "--socket",
            path,
            "--preload",
            preload,
            "--adopt",
            adopt,
        ],
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        import argparse

        parser = argparse.ArgumentParser(
            prog="python -m infra.runs.warm_start serve", description=__doc__.split("\n")[0]
        )
        parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV), required=not os.environ.get(SOCKET_ENV))
        parser.add_argument("--preload", default=",".join(PRELOAD), help="modules to import once (comma-separated)")
        parser.add_argument("--adopt", default="", help=argparse.SUPPRESS)
        args = parser.parse_args(argv[1:])
        adopt = dict(tuple(map(int, pair.split(":"))) for pair in args.adopt.split(",") if pair)
        serve(args.socket, tuple(filter(None, args.preload.split(","))), adopt)
        return 0
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
