"""Start and stop the S3 servers of the storage and pipeline tests: moto (its server mode: a real HTTP endpoint) and
s3rver (a Node.js S3 server, tests/s3rver/), for the storage tests that run on both.

Set TRAINYARD_TEST_S3_ENDPOINT_URL (with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for it) to run the same tests
against another endpoint, e.g. a MinIO; the tests that need moto itself then skip. The fixtures are in
tests/conftest.py: `s3_endpoint` (the session's server), `s3rver_endpoint`, `s3_env`, `s3` (a plain boto3 client)
and `bucket`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from waiting import free_port

ACCESS_KEY = "AKIDTRAINYARDTEST"
SECRET_KEY = "ty-secret-6f1d2c9a-never-log-me"  # tests look for this value in errors, logs and pickles
S3RVER_DIR = Path(__file__).with_name("s3rver")  # its pinned package; `make test` installs node_modules with npm ci


@dataclass(frozen=True)
class Endpoint:
    url: str
    server: str  # "moto", "s3rver" or "external" (TRAINYARD_TEST_S3_ENDPOINT_URL)
    access_key: str
    secret_key: str

    @property
    def is_moto(self) -> bool:
        return self.server == "moto"


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
    wait_until_answers(proc, f"{url}/moto-api/data.json", f"moto_server on port {port}")
    return proc, url


def add_iam_user(url: str) -> tuple[str, str]:
    """A user allowed s3:* on a moto server started with authentication on; its access key id and secret.

    Takes three unauthenticated requests: start the server with INITIAL_NO_AUTH_ACTION_COUNT=3. Unlike an unknown
    access key, a known one lets moto check the request's SigV4 signature against its secret."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName="trainyard-test")
    key = iam.create_access_key(UserName="trainyard-test")["AccessKey"]
    allow_s3 = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
    iam.put_user_policy(UserName="trainyard-test", PolicyName="s3", PolicyDocument=allow_s3)
    return key["AccessKeyId"], key["SecretAccessKey"]


def s3rver_unavailable() -> str | None:
    """Why s3rver cannot run on this machine, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed: s3rver (tests/s3rver) is a Node.js server"
    if not (S3RVER_DIR / "node_modules" / ".package-lock.json").is_file():  # npm writes it when an install completes
        return f"s3rver is not installed: `make test` installs it (npm ci in {S3RVER_DIR}; needs npm)"
    return None


@contextmanager
def running_s3rver(access_key: str, secret_key: str) -> Iterator[str]:
    """s3rver on a free port of 127.0.0.1, storing into a temp directory, knowing only this key pair; its URL.

    Stopped, and its directory removed, on exit. The keys travel in the environment, never on a command line."""
    home = Path(tempfile.mkdtemp(prefix="trainyard-s3rver-"))
    port = free_port()
    keys = {"S3RVER_ACCESS_KEY_ID": access_key, "S3RVER_SECRET_ACCESS_KEY": secret_key}
    (home / "data").mkdir()
    with open(home / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(
            ["node", str(S3RVER_DIR / "serve.js"), str(home / "data"), str(port)],
            env={**os.environ, **keys},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(proc, url, f"s3rver on port {port}", log=home / "stderr.log")
        yield url
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def wait_until_answers(
    proc: subprocess.Popen, url: str, what: str, timeout_s: float = 30, log: Path | None = None
) -> None:
    """Poll url until the server answers at all (any HTTP status); kill it if it exits or never answers (the error
    quotes the end of its log, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # an S3 error document is an answer
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                said = f": {log.read_text(errors='replace')[-2000:]}" if log else ""
                raise RuntimeError(f"{what} did not start (exit code {proc.poll()}){said}") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
