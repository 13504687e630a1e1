"""Start and stop a moto S3 server (its server mode: a real HTTP endpoint) for the storage and pipeline tests.

Set TRAINYARD_TEST_S3_ENDPOINT_URL (with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for it) to run the same tests
against another endpoint, e.g. a MinIO; the tests that need moto itself then skip. The fixtures are in
tests/conftest.py: `s3_endpoint` (the session's server), `s3_env`, `s3` (a plain boto3 client) and `bucket`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "AKIDTRAINYARDTEST"
SECRET_KEY = "ty-secret-6f1d2c9a-never-log-me"  # tests look for this value in errors, logs and pickles


@dataclass(frozen=True)
class Endpoint:
    url: str
    is_moto: bool
    access_key: str
    secret_key: str


def client_env(endpoint: Endpoint, scratch: Path) -> dict[str, str]:
    """Credentials and endpoint as a user sets them in the environment; nothing from ~/.aws or an instance role.

    The variables to delete are given as empty strings: apply with `env_applied`."""
    cleared = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")
    cleared += ("TRAINYARD_S3_CREDENTIALS_BLOCK", "TRAINYARD_PRESIGNED_URL_EXPIRES_S")
    return {
        **dict.fromkeys(cleared, ""),
        "AWS_ACCESS_KEY_ID": endpoint.access_key,
        "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
        "TRAINYARD_S3_ENDPOINT_URL": endpoint.url,
    }


def env_applied(monkeypatch, variables: dict[str, str]) -> None:
    """Set the variables with a pytest MonkeyPatch; an empty value deletes the variable."""
    for name, value in variables.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)


def client(endpoint: Endpoint):
    """A plain boto3 client on the endpoint: how tests arrange and inspect a bucket behind Trainyard's back."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name="us-east-1",
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_moto(extra_env: dict[str, str] | None = None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """moto_server on a free port of `host`, up and answering; the caller stops it."""
    port = free_port(host)
    moto_server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto_server), "-H", host, "-p", str(port)],
        env={**os.environ, **(extra_env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port} (exit code {proc.poll()})") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
