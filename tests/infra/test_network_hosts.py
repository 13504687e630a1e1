"""The multi-host layout of docs/scale-out.md over a real network: a control host and a training host that share
nothing but a link.

The training host is a Linux network namespace joined to this one by a veth pair: its own interfaces, routes and
loopback, so it reaches the control host only at the control host's address on that link, as a second machine
would (its 127.0.0.1 is its own). The control host binds its servers to its side of the link: PostgreSQL (a
throwaway cluster trusting the link's subnet), the S3 endpoint (moto's server mode), then `python -m infra.stack up
--role control` with TRAINYARD_HOST set to that address. The training host runs `python -m infra.stack up --role
worker` inside the namespace with its own TRAINYARD_HOME and no S3 credentials. A training run triggered on the
control host's Prefect API must run there end to end: dataset synced from S3 into that host's cache, training,
evaluation, ONNX export to the bucket, the model registered in the control host's MLflow.

Needs root (namespaces and veth), `ip` (iproute2) and PostgreSQL's server programs; without them it skips and says
which. The files are shared (one disk): what the test shows is the network, and that the hosts keep their state apart.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pg_cluster import missing_programs, throwaway_cluster
from s3_server import ACCESS_KEY, SECRET_KEY, free_port, start_moto, stop

from infra.settings import ROOT, Settings
from trainers.data.synthetic import make_shapes_classification

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/infra is not a package (its name is the project's)
from test_shared_stack import SharedStack, clean_env, cli, deploy_torch_demo, train_on_a_worker  # noqa: E402

POOL = "trainyard-local"  # the torch demo deployment's pool (prefect.yaml): only the training host serves it
WORKER = "net-host-1"


@dataclass(frozen=True)
class Link:
    """A network namespace (the training host) and the two ends of its veth link."""

    namespace: str
    control_ip: str
    host_ip: str

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
        """A command on the training host: inside the namespace."""
        command = ["ip", "netns", "exec", self.namespace, *argv]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ip(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)


@contextmanager
def linked_namespace() -> Iterator[Link]:
    """A namespace and a veth pair on a /30 of 10.231.0.0/16 chosen at random (two runs at once do not clash);
    deleted on the way out, which also deletes the pair."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2's `ip` to make a network namespace for the training host")
    name, octet = f"ty-{uuid.uuid4().hex[:8]}", secrets.randbelow(64) * 4
    subnet = f"10.231.{secrets.randbelow(256)}"
    link = Link(name, f"{subnet}.{octet + 1}", f"{subnet}.{octet + 2}")
    outside, inside = f"{name}-c", f"{name}-h"[:15]  # interface names: 15 characters at most
    created = _ip("netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {created.stderr.strip()}")
    try:
        for step in (
            ("link", "add", outside[:15], "type", "veth", "peer", "name", inside),
            ("link", "set", inside, "netns", name),
            ("addr", "add", f"{link.control_ip}/30", "dev", outside[:15]),
            ("link", "set", outside[:15], "up"),
            ("-n", name, "addr", "add", f"{link.host_ip}/30", "dev", inside),
            ("-n", name, "link", "set", inside, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ):
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield link
    finally:
        _ip("link", "del", outside[:15])
        _ip("netns", "del", name)


@dataclass(frozen=True)
class TwoHosts:
    link: Link
    stack: SharedStack  # the control host's settings and environment, and the bucket
    host: dict[str, str]  # the training host's environment
    dataset: str  # s3:// URI of the generated dataset


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Iterator[TwoHosts]:
    if missing := missing_programs():
        pytest.skip(f"needs PostgreSQL's server programs for the control host's own cluster; missing: {missing}")
    import boto3

    tmp = tmp_path_factory.mktemp("net")
    with linked_namespace() as link:
        hba = f"host all all {link.control_ip.rsplit('.', 1)[0]}.0/24 trust"
        with throwaway_cluster(free_port(link.control_ip), listen=link.control_ip, hba=hba) as postgres:
            moto, endpoint = start_moto(host=link.control_ip)
            try:
                s3 = boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                    region_name="us-east-1",
                )
                bucket = f"ty-net-{uuid.uuid4().hex[:8]}"
                s3.create_bucket(Bucket=bucket)
                shapes = make_shapes_classification(tmp / "shapes", train_per_class=8, val_per_class=4)
                for path in (p for p in shapes.rglob("*") if p.is_file()):
                    s3.upload_file(str(path), bucket, f"datasets/shapes/{path.relative_to(shapes).as_posix()}")
                control_env = {
                    **clean_env(tmp),
                    "TRAINYARD_HOME": str(tmp / "control"),
                    "TRAINYARD_HOST": link.control_ip,  # the servers listen there, and every host reaches them there
                    "TRAINYARD_PREFECT_PORT": str(free_port(link.control_ip)),
                    "TRAINYARD_MLFLOW_PORT": str(free_port(link.control_ip)),
                    "TRAINYARD_DATABASE_URL": f"postgresql://postgres@{postgres.host}:{postgres.port}/ty_net",
                    "TRAINYARD_ARTIFACT_STORE": f"s3://{bucket}/team",
                    "TRAINYARD_S3_ENDPOINT_URL": endpoint,
                    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true",
                }
                stack = SharedStack(Settings.from_env(control_env), control_env, tmp, bucket, s3)
                host = stack.host_env("training-host")
                try:
                    cli("up", "--role", "control", env=control_env)
                    deploy_torch_demo(stack.client_env(control_env))
                    up = link.run(
                        sys.executable, "-m", "infra.stack", "up", "--role", "worker", "--pool", POOL,
                        "--name", WORKER, "--limit", "1", env=host,
                    )  # fmt: skip
                    assert up.returncode == 0, f"up --role worker in the namespace:\n{up.stdout}\n{up.stderr}"
                    yield TwoHosts(link, stack, host, f"s3://{bucket}/datasets/shapes")
                finally:
                    cli("down", env=host, check=False)
                    cli("down", env=control_env, check=False)
            finally:
                stop(moto)


def test_the_training_host_reaches_the_control_host_only_over_the_link(two_hosts):
    """The namespace is a host of its own: the control host's servers answer at its link address, not at 127.0.0.1."""
    settings = two_hosts.stack.settings
    probe = "import socket, sys; sys.exit(socket.socket().connect_ex((sys.argv[1], int(sys.argv[2]))))"
    over_link = two_hosts.link.run(sys.executable, "-c", probe, settings.host, str(settings.prefect_port))
    on_loopback = two_hosts.link.run(sys.executable, "-c", probe, "127.0.0.1", str(settings.prefect_port))
    assert over_link.returncode == 0, over_link.stderr
    assert on_loopback.returncode != 0  # refused: that loopback is the training host's own


def test_a_run_triggered_on_the_control_host_trains_on_the_training_host_end_to_end(two_hosts):
    from mlflow import MlflowClient

    settings, host = two_hosts.stack.settings, two_hosts.host
    run = train_on_a_worker(settings.prefect_api, two_hosts.dataset, "net-hosts")
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"

    worker_log = (Path(host["TRAINYARD_HOME"]) / "logs" / "worker.log").read_text()
    assert f"Worker '{WORKER}' submitting flow run '{run.id}'" in worker_log  # the training host's worker ran it
    synced = Path(host["TRAINYARD_HOME"]) / "cache" / "datasets" / two_hosts.stack.bucket / "datasets" / "shapes"
    assert (synced / "train").is_dir()  # into the training host's own cache
    assert not (Path(two_hosts.stack.control_env["TRAINYARD_HOME"]) / "cache" / "datasets").exists()

    client = MlflowClient(settings.mlflow_uri)
    [mlflow_run] = client.search_runs(
        [client.get_experiment_by_name("net-hosts").experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'"
    )
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train_loss")] == [1]
    [version] = client.search_model_versions("name = 'net-hosts'")
    assert version.run_id == mlflow_run.info.run_id

    uploaded = two_hosts.stack.objects("team/")
    onnx = [key for key in uploaded if key.endswith("model.onnx")]
    assert onnx and all(uploaded[key] > 0 for key in onnx), sorted(uploaded)
    tags = mlflow_run.data.tags
    assert tags["onnx.uri"].startswith(f"s3://{two_hosts.stack.bucket}/team/")
    assert SECRET_KEY not in worker_log and SECRET_KEY not in json.dumps(tags)  # the host read it from the block
