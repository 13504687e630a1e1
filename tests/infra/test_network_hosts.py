"""The multi-host layout of docs/scale-out.md over a real network: a control host and training hosts that share
nothing but a LAN.

Each training host is a Linux network namespace plugged into a bridge (a veth pair each): its own interfaces,
routes and loopback, so it reaches the control host only at the control host's LAN address, as a second machine
would (its 127.0.0.1 is its own). The control host is this namespace; it binds its servers to its LAN address:
PostgreSQL (a throwaway cluster trusting the LAN), the S3 endpoint (moto's server mode), then `python -m infra.stack
up --role control` with TRAINYARD_HOST set to that address. A training host runs `python -m infra.stack up --role
worker` inside its namespace, with its own TRAINYARD_HOME and no S3 credentials; where a test needs it, also with a
disk of its own at the control host's runs directory (a private bind mount: the same path, other files).

Needs root (namespaces, veth, a bridge), iproute2, util-linux's unshare and PostgreSQL's server programs; without
them it skips and says which.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pg_cluster import missing_programs, throwaway_cluster
from s3_server import SECRET_KEY, start_moto, stop
from waiting import free_port, gone_at, wait_for

from infra.settings import ROOT, Settings
from trainers.data.synthetic import make_shapes_classification

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/infra is not a package (its name is the project's)
from test_shared_stack import (  # noqa: E402
    SharedStack,
    cli,
    control_host_env,
    deploy_torch_demo,
    flow_run_logs,
    new_bucket,
    train_on_a_worker,
)

POOL = "trainyard-local"  # the torch demo deployment's pool (prefect.yaml): only the first training host serves it
EXPERIMENT = "net-hosts"
EPOCHS = 60  # long enough that host A is still training when its first checkpoint is in the bucket


def _ip(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)


def _ip_ok(*argv: str) -> None:
    done = _ip(*argv)
    assert done.returncode == 0, f"ip {' '.join(argv)}: {done.stderr}"


@dataclass
class Lan:
    """A bridge with the control host's address, and a namespace per training host plugged into it."""

    bridge: str
    prefix: str  # the /24's first three octets
    namespaces: list[str] = field(default_factory=list)

    @property
    def control_ip(self) -> str:
        return f"{self.prefix}.1"

    def plug_in(self, name: str) -> tuple[str, str]:
        """A new namespace on the LAN; returns (namespace, its address)."""
        namespace, address = f"{self.bridge}-{name}"[:32], f"{self.prefix}.{len(self.namespaces) + 2}"
        outside, inside = f"{self.bridge}v{len(self.namespaces)}", "eth0"
        _ip_ok("netns", "add", namespace)
        self.namespaces.append(namespace)
        _ip_ok("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
        _ip_ok("link", "set", outside, "master", self.bridge)
        _ip_ok("link", "set", outside, "up")
        _ip_ok("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _ip_ok("-n", namespace, "link", "set", inside, "up")
        _ip_ok("-n", namespace, "link", "set", "lo", "up")
        return namespace, address


@contextmanager
def lan() -> Iterator[Lan]:
    """A bridge on a /24 of 10.231.0.0/16 chosen at random (two runs at once do not clash); the namespaces, their
    veth pairs and the bridge are deleted on the way out."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2's `ip` to make network namespaces for the training hosts")
    network = Lan(f"ty{uuid.uuid4().hex[:6]}", f"10.231.{secrets.randbelow(256)}")
    created = _ip("link", "add", network.bridge, "type", "bridge")
    if created.returncode != 0:
        pytest.skip(f"cannot make a network bridge here: {created.stderr.strip()}")
    try:
        _ip_ok("addr", "add", f"{network.control_ip}/24", "dev", network.bridge)
        _ip_ok("link", "set", network.bridge, "up")
        yield network
    finally:
        for namespace in network.namespaces:
            _ip("netns", "del", namespace)  # takes its end of the veth pair, and so the pair, with it
        _ip("link", "del", network.bridge)


@dataclass(frozen=True)
class TrainingHost:
    namespace: str
    address: str
    env: dict[str, str]
    worker: str  # the worker's name on the Prefect server

    def run(self, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """A command on this host: in its namespace, with its environment."""
        command = ["ip", "netns", "exec", self.namespace, *argv]
        return subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def worker_log(self) -> str:
        return (Path(self.env["TRAINYARD_HOME"]) / "logs" / "worker.log").read_text()

    def cut_off(self) -> None:
        """Unplug the host from the LAN: it runs on, but nothing it sends reaches another host."""
        _ip_ok("-n", self.namespace, "link", "set", "eth0", "down")

    def power_off(self) -> None:
        """kill -9 of every process on the host, as when it loses power."""
        for pid in _ip("netns", "pids", self.namespace).stdout.split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@dataclass
class Cluster:
    lan: Lan
    stack: SharedStack  # the control host's settings and environment, and the bucket
    dataset: str  # s3:// URI of the generated dataset
    hosts: list[TrainingHost] = field(default_factory=list)

    def add_profiles(self, *profiles: tuple[str, int]) -> dict[str, str]:
        """One process profile per (name, priority), each on a pool of its name, applied from the control host;
        returns the control host's shell environment."""
        shell = self.stack.client_env(self.stack.control_env)
        for name, priority in profiles:
            add = ["add", name, "--kind", "process", "--work-pool", name, "--priority", str(priority)]
            add += ["--max-concurrent", "1"]
            subprocess.run([sys.executable, "-m", "infra.compute.profiles", *add], cwd=ROOT, env=shell, check=True)
        subprocess.run([sys.executable, "-m", "infra.stack.apply"], cwd=ROOT, env=shell, check=True, timeout=300)
        return shell

    def train_from_control_host(self, shell: dict[str, str], profiles: list[str], experiment: str):
        """The train flow in a process of the control host (EPOCHS, a checkpoint per epoch); it prints
        `STATE <type> <flow run id>` at the end."""
        request = dict(
            dataset=self.dataset, compute={"profiles": profiles}, epochs=EPOCHS, batch_size=8, image_size=32,
            experiment=experiment, registered_model=experiment, checkpoint={"min_interval_seconds": 0},
        )  # fmt: skip
        code = f"""
            from flows.train import train
            state = train(**{request!r}, return_state=True)
            print("STATE", state.type.value, state.state_details.flow_run_id, flush=True)
        """
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=ROOT,
            env=shell,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def start_host(self, name: str, pool: str, own_runs_disk: bool = False, own_hostname: bool = False) -> TrainingHost:
        """`up --role worker --pool POOL` on a new host of the LAN; with own_runs_disk, the host has its own files at
        the control host's runs directory, as another machine would; with own_hostname, its processes see `name` as
        their host name (a UTS namespace), as another machine's would."""
        namespace, address = self.lan.plug_in(name)
        host = TrainingHost(namespace, address, self.stack.host_env(name), f"{name}-worker")
        up = [sys.executable, "-m", "infra.stack", "up", "--role", "worker", "--pool", pool, "--name", host.worker]
        if own_runs_disk:
            disk, runs = Path(host.env["TRAINYARD_HOME"]) / "disk", self.stack.settings.runs_dir
            disk.mkdir()
            runs.mkdir(parents=True, exist_ok=True)
            mount = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'  # the worker and its runs inherit the mount
            up = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", str(disk), str(runs), *up]
        if own_hostname:
            up = ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", name, *up]
        started = host.run(*up, "--limit", "1")
        self.hosts.append(host)
        assert started.returncode == 0, f"up --role worker on {name}:\n{started.stdout}\n{started.stderr}"
        return host


def completed_request(flow: subprocess.Popen) -> str:
    """The id of the train flow run that `flow` (Cluster.train_from_control_host) ran, which must have Completed."""
    try:
        out, _ = flow.communicate(timeout=600)
    finally:
        if flow.poll() is None:
            flow.kill()
    assert "STATE COMPLETED" in out, out[-3000:]
    return out.split("STATE COMPLETED")[-1].split()[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    if missing := missing_programs():
        pytest.skip(f"needs PostgreSQL's server programs for the control host's own cluster; missing: {missing}")
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux's unshare to give a training host a disk of its own")
    tmp = tmp_path_factory.mktemp("net")
    with lan() as network:
        hba = f"host all all {network.prefix}.0/24 trust"
        with throwaway_cluster(free_port(network.control_ip), listen=network.control_ip, hba=hba) as postgres:
            moto, endpoint = start_moto(host=network.control_ip)
            try:
                s3, bucket = new_bucket(endpoint, "ty-net")
                shapes = make_shapes_classification(tmp / "shapes", train_per_class=8, val_per_class=4)
                for path in (p for p in shapes.rglob("*") if p.is_file()):
                    s3.upload_file(str(path), bucket, f"datasets/shapes/{path.relative_to(shapes).as_posix()}")
                database_url = f"postgresql://postgres@{postgres.host}:{postgres.port}/ty_net"
                # The servers listen on the control host's LAN address; every host reaches them there.
                control_env = control_host_env(tmp, network.control_ip, database_url, f"s3://{bucket}/team", endpoint)
                running = Cluster(
                    network,
                    SharedStack(Settings.from_env(control_env), control_env, tmp, bucket, s3),
                    f"s3://{bucket}/datasets/shapes",
                )
                try:
                    cli("up", "--role", "control", env=control_env)
                    deploy_torch_demo(running.stack.client_env(control_env))
                    yield running
                finally:
                    for host in running.hosts:
                        cli("down", env=host.env, check=False)
                    cli("down", env=control_env, check=False)
            finally:
                stop(moto)


@pytest.fixture(scope="module")
def demo_host(cluster) -> TrainingHost:
    """The one training host that serves the torch demo deployment's pool."""
    return cluster.start_host("gpu1", POOL)


def test_a_training_host_reaches_the_control_host_only_over_the_lan(cluster, demo_host):
    """The namespace is a host of its own: the control host's servers answer at its LAN address, not at 127.0.0.1."""
    settings = cluster.stack.settings
    probe = "import socket, sys; sys.exit(socket.socket().connect_ex((sys.argv[1], int(sys.argv[2]))))"
    over_the_lan = demo_host.run(sys.executable, "-c", probe, settings.host, str(settings.prefect_port))
    on_loopback = demo_host.run(sys.executable, "-c", probe, "127.0.0.1", str(settings.prefect_port))
    assert over_the_lan.returncode == 0, over_the_lan.stderr
    assert on_loopback.returncode != 0  # refused: that loopback is the training host's own


def test_a_run_triggered_on_the_control_host_trains_on_the_training_host_end_to_end(cluster, demo_host):
    from mlflow import MlflowClient

    settings, home = cluster.stack.settings, Path(demo_host.env["TRAINYARD_HOME"])
    run = train_on_a_worker(settings.prefect_api, cluster.dataset, EXPERIMENT)
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"

    assert f"Worker '{demo_host.worker}' submitting flow run '{run.id}'" in demo_host.worker_log()
    synced = home / "cache" / "datasets" / cluster.stack.bucket / "datasets" / "shapes"
    assert (synced / "train").is_dir()  # into the training host's own cache
    assert not (Path(cluster.stack.control_env["TRAINYARD_HOME"]) / "cache" / "datasets").exists()

    client = MlflowClient(settings.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    [mlflow_run] = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train_loss")] == [1]
    [version] = client.search_model_versions(f"name = '{EXPERIMENT}'")
    assert version.run_id == mlflow_run.info.run_id

    uploaded = cluster.stack.objects("team/")
    onnx = [key for key in uploaded if key.endswith("model.onnx")]
    assert onnx and all(uploaded[key] > 0 for key in onnx), sorted(uploaded)
    tags = mlflow_run.data.tags
    assert tags["onnx.uri"].startswith(f"s3://{cluster.stack.bucket}/team/")
    assert SECRET_KEY not in demo_host.worker_log() and SECRET_KEY not in json.dumps(tags)  # it read the block


def test_a_training_host_that_dies_is_replaced_by_another_that_resumes_its_work_from_s3(cluster):
    """Two training hosts on their own pools and disks; the train flow runs on the control host. Host A loses power
    mid-training; the zombie automation marks its step Crashed, the flow falls back to host B, which restores A's
    pushed checkpoints over the LAN and finishes the training, evaluation and export; the flow registers the model."""
    from mlflow import MlflowClient

    from infra.compute.store import Store

    control_shell = cluster.add_profiles(("net-a", 1), ("net-b", 2))
    host_a = cluster.start_host("net-a", "net-a", own_runs_disk=True)
    host_b = cluster.start_host("net-b", "net-b", own_runs_disk=True)

    flow = cluster.train_from_control_host(control_shell, ["net-a", "net-b"], "net-fallback")
    try:
        deadline = time.monotonic() + 300
        while not [key for key in cluster.stack.objects("team/net-fallback/") if key.endswith("/latest.json")]:
            assert time.monotonic() < deadline and flow.poll() is None, "host A never pushed a checkpoint"
            time.sleep(0.5)
        host_a.power_off()
    except BaseException:
        flow.kill()
        raise
    request_id = completed_request(flow)

    attempts = Store(cluster.stack.settings.database.url("postgresql+psycopg")).attempts(request_id)
    assert [(a.profile, a.outcome) for a in attempts] == [("net-a", "crashed"), ("net-b", "completed")]
    step_log = flow_run_logs(cluster.stack.settings.prefect_api, attempts[1].flow_run_id)
    assert "restored" in step_log and "from s3://" in step_log and "resuming from" in step_log
    assert "ONNX parity on" in step_log  # evaluated and exported on B, where it trained
    assert list((Path(host_b.env["TRAINYARD_HOME"]) / "disk").iterdir())  # B trained on its own disk, not A's
    # B also evaluated and exported there: the flow's host fetched nothing, it registered from the MLflow run.
    assert "restored" not in flow_run_logs(cluster.stack.settings.prefect_api, request_id)

    client = MlflowClient(cluster.stack.settings.mlflow_uri)
    experiment = client.get_experiment_by_name("net-fallback").experiment_id
    [mlflow_run] = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{request_id}'")
    assert mlflow_run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))  # every epoch once: none lost with host A, none trained twice
    [version] = client.search_model_versions("name = 'net-fallback'")
    assert version.run_id == mlflow_run.info.run_id


def test_a_training_host_cut_off_from_the_lan_stops_its_training_before_another_host_resumes_it(cluster):
    """Host C loses its network mid-training: it runs on, but nothing of it reaches the control host. The zombie
    automation marks its step Crashed; host C's launcher, whose heartbeats no longer get through, kills the training
    after 60 s; the control host takes C's run as gone only once C's launcher has been silent for 80 s, and then
    falls back to host D, which resumes from C's pushed checkpoints. The two trainings never run at once."""
    import threading
    from datetime import UTC, datetime, timedelta

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.compute.store import Store
    from infra.runs.fencing import launcher_events

    control_shell = cluster.add_profiles(("net-c", 3), ("net-d", 4))
    host_c = cluster.start_host("net-c", "net-c", own_runs_disk=True, own_hostname=True)
    cluster.start_host("net-d", "net-d", own_runs_disk=True, own_hostname=True)

    flow = cluster.train_from_control_host(control_shell, ["net-c", "net-d"], "net-cut")
    store = Store(cluster.stack.settings.database.url("postgresql+psycopg"))
    gone: list[datetime] = []
    try:
        deadline = time.monotonic() + 300
        while not [key for key in cluster.stack.objects("team/net-cut/") if key.endswith("/latest.json")]:
            assert time.monotonic() < deadline and flow.poll() is None, "host C never pushed a checkpoint"
            time.sleep(0.5)
        [step] = [a.flow_run_id for a in store.attempts() if a.profile == "net-c"]
        api = {PREFECT_API_URL: cluster.stack.settings.prefect_api}  # the control host's server, not the session's
        with temporary_settings(api), get_client(sync_client=True) as client:
            since = datetime.now(UTC) - timedelta(minutes=10)
            [beat, *_] = wait_for(lambda: launcher_events(client, step, since), "host C's launcher heartbeat", 60)
        assert beat.payload["host"] == "net-c"
        training = psutil.Process(beat.payload["pid"])  # the same machine underneath: the test can watch it
        watcher = threading.Thread(target=lambda: gone.append(gone_at(training)), daemon=True)
        watcher.start()
        host_c.cut_off()
    except BaseException:
        flow.kill()
        raise
    request_id = completed_request(flow)
    c, d = store.attempts(request_id)
    assert (c.profile, c.outcome, d.profile, d.outcome) == ("net-c", "crashed", "net-d", "completed")
    assert "launcher on net-c has been silent" in c.reason, c.reason
    assert gone and gone[0] < d.started_at.replace(tzinfo=UTC), (gone, d.started_at)
    assert "cut off" in host_c.worker_log()  # its launcher said why it stopped the training
    step_log = flow_run_logs(cluster.stack.settings.prefect_api, d.flow_run_id)
    assert "resuming from" in step_log
