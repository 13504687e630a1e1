"""Storage against real S3-compatible servers (moto, and s3rver for the tests marked ON_BOTH_SERVERS; see
conftest.py), and the local backend."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, ConnectionClosedError
from s3_server import SECRET_KEY, Endpoint, add_iam_user, start_moto, stop

from infra.storage import ChecksumError, StorageError, project_prefix, storage_for
from infra.storage.local import LocalStorage
from infra.storage.s3 import S3Storage

MB = 1024 * 1024
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)  # moto's smallest part: 5 MB
# A second implementation of S3 catches what one server's leniency hides; s3rver also checks presigned-URL expiry.
ON_BOTH_SERVERS = pytest.mark.parametrize("s3_env", ["moto", "s3rver"], indirect=True)


def put_dataset(s3, bucket: str, prefix: str, count: int = 12) -> dict[str, bytes]:
    """count images in split/class/ folders, and files at other depths (the listing splits by level)."""
    files = {
        f"{'train' if i % 3 else 'val'}/{'cat' if i % 2 else 'dog'}/{i}.png": os.urandom(100 + i) for i in range(count)
    }
    files |= {"data.yaml": b"names: [cat, dog]", "train/labels.csv": b"", "train/cat/extra/deep.png": b"deep"}
    for rel, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
    return files


def get_counter(storage: S3Storage) -> list[str]:
    """The object keys Trainyard GETs, as the client sends them."""
    calls: list[str] = []
    events = storage.client.meta.events
    events.register("before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"]))
    return calls


def stats(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".trainyard")
    }


def expires(url: str) -> str:
    return parse_qs(urlparse(url).query)["X-Amz-Expires"][0]


def expiry(url: str) -> float:
    """When a SigV4 presigned URL stops working (epoch seconds): its signing time plus X-Amz-Expires."""
    signed = datetime.strptime(parse_qs(urlparse(url).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    return signed.replace(tzinfo=UTC).timestamp() + int(expires(url))


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture(autouse=True)
def one_flat_listing_on_s3rver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """s3rver 3.7.1 leaves out of CommonPrefixes a folder that holds only folders (its directory walk stops at the
    delimiter), so the split listing would miss their files there: on s3rver, sync lists the prefix in one go."""
    callspec = getattr(request.node, "callspec", None)
    if callspec and callspec.params.get("s3_env") == "s3rver":
        monkeypatch.setattr("infra.storage.s3.LIST_SPLIT_DEPTH", 0)


def lists_multipart_uploads(endpoint: Endpoint) -> bool:
    """s3rver 3.7.1 answers ListMultipartUploads with NotImplemented: there no test can see an unfinished upload."""
    return endpoint.server != "s3rver"


# --- dataset sync --------------------------------------------------------------------------------------------


@ON_BOTH_SERVERS
def test_sync_downloads_everything_once_then_nothing(s3, bucket, tmp_path):
    files = put_dataset(s3, bucket, "datasets/pets")
    s3.put_object(Bucket=bucket, Key="datasets/pets/train/", Body=b"")  # a console "folder": no data, not a file
    storage = storage_for(f"s3://{bucket}/datasets/pets")
    gets = get_counter(storage)

    first = storage.sync_to_cache(tmp_path / "cache")

    assert first.path == tmp_path / "cache" / bucket / "datasets/pets"
    assert (first.downloaded, first.unchanged, first.removed) == (len(files), 0, 0)
    assert first.bytes_downloaded == sum(len(b) for b in files.values())
    assert {rel: (first.path / rel).read_bytes() for rel in files} == files
    assert len(gets) == len(files)
    before = stats(first.path)

    second = storage.sync_to_cache(tmp_path / "cache")

    assert (second.downloaded, second.unchanged, second.removed) == (0, len(files), 0)
    assert len(gets) == len(files), "a cache hit sent GET requests"
    assert stats(second.path) == before  # same inodes, same mtimes: nothing was rewritten


@ON_BOTH_SERVERS
def test_sync_fetches_only_what_changed_and_drops_what_was_removed(s3, bucket, tmp_path):
    files = put_dataset(s3, bucket, "ds")
    storage = storage_for(f"s3://{bucket}/ds")
    root = storage.sync_to_cache(tmp_path).path
    changed, removed = "train/cat/1.png", "val/dog/0.png"
    s3.put_object(Bucket=bucket, Key=f"ds/{changed}", Body=b"new bytes")
    s3.put_object(Bucket=bucket, Key="ds/test/bird/new.png", Body=b"a new file")
    s3.delete_object(Bucket=bucket, Key=f"ds/{removed}")
    before = stats(root)
    gets = get_counter(storage)

    result = storage.sync_to_cache(tmp_path)

    assert (result.downloaded, result.removed, result.unchanged) == (2, 1, len(files) - 2)
    assert sorted(gets) == ["ds/test/bird/new.png", f"ds/{changed}"]
    assert (root / changed).read_bytes() == b"new bytes"
    assert (root / "test/bird/new.png").read_bytes() == b"a new file"
    assert not (root / removed).exists()
    after = stats(root)
    untouched = set(files) - {changed, removed}
    assert {rel: after[rel] for rel in untouched} == {rel: before[rel] for rel in untouched}


def test_sync_repairs_a_file_edited_in_the_cache(s3, bucket, tmp_path):
    files = put_dataset(s3, bucket, "ds", count=3)
    storage = storage_for(f"s3://{bucket}/ds")
    root = storage.sync_to_cache(tmp_path).path
    rel = next(iter(files))
    (root / rel).write_bytes(bytes(len(files[rel])))  # same size: only the mtime gives it away

    result = storage.sync_to_cache(tmp_path)

    assert result.downloaded == 1
    assert (root / rel).read_bytes() == files[rel]


@ON_BOTH_SERVERS
def test_sync_refuses_a_corrupt_object_and_keeps_no_file(s3, bucket, tmp_path):
    put_dataset(s3, bucket, "ds", count=4)
    bad = "train/cat/corrupt.png"
    s3.put_object(Bucket=bucket, Key=f"ds/{bad}", Body=b"bytes", Metadata={"sha256": "0" * 64})
    storage = storage_for(f"s3://{bucket}/ds")

    with pytest.raises(ChecksumError, match=f"s3://{bucket}/ds/{bad} failed verification") as error:
        storage.sync_to_cache(tmp_path)

    root = tmp_path / bucket / "ds"
    assert "upload it again" in str(error.value)
    assert not (root / bad).exists()
    assert not list(root.rglob("*.part")) and not (root / ".trainyard-tmp").exists()
    # Every other file arrived and is kept, so fixing the object costs one download.
    assert (root / "data.yaml").exists() and len(stats(root)) == 4 + 3
    s3.put_object(
        Bucket=bucket, Key=f"ds/{bad}", Body=b"bytes", Metadata={"sha256": hashlib.sha256(b"bytes").hexdigest()}
    )
    assert storage.sync_to_cache(tmp_path).downloaded == 1


@pytest.mark.parametrize("layout", ["flat", "wide"])  # not on s3rver: its CommonPrefixes miss folders of folders
def test_sync_lists_every_layout(s3, bucket, tmp_path, monkeypatch, layout):
    monkeypatch.setattr("infra.storage.s3.LIST_SPLIT_MAX", 3)  # "wide": more folders than the split takes
    rels = [f"{i}.png" if layout == "flat" else f"class{i}/{i}.png" for i in range(5)] + ["a/b/c/deep.png"]
    for rel in rels:
        s3.put_object(Bucket=bucket, Key=f"ds/{rel}", Body=rel.encode())

    result = storage_for(f"s3://{bucket}/ds").sync_to_cache(tmp_path)

    assert result.downloaded == len(rels)
    assert all((result.path / rel).read_bytes() == rel.encode() for rel in rels)


@ON_BOTH_SERVERS
def test_sync_of_an_empty_prefix_says_so(s3, bucket, tmp_path):
    with pytest.raises(StorageError, match=f"No objects under s3://{bucket}/typo/"):
        storage_for(f"s3://{bucket}/typo").sync_to_cache(tmp_path)


# --- checkpoints: upload, pointer, download --------------------------------------------------------------------


@ON_BOTH_SERVERS
def test_checkpoint_round_trip_is_verified(s3, bucket, tmp_path):
    storage = S3Storage(bucket, "proj/checkpoints/run-1", transfer=SMALL_PARTS)
    ckpt = random_file(tmp_path / "last.pt", 12 * MB)  # 3 parts
    parts = []  # counted as sent: s3rver's ETag of a multipart object is its MD5, without S3's "-3"
    storage.client.meta.events.register("after-call.s3.UploadPart", lambda **_: parts.append(1))

    stored = storage.upload_file(ckpt, "last.pt", pointer="latest.json")

    assert len(parts) == 3
    head = s3.head_object(Bucket=bucket, Key="proj/checkpoints/run-1/last.pt")
    assert head["Metadata"]["sha256"] == stored.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert storage.read_pointer("latest.json") == stored
    dest = storage.download_file(stored.key, tmp_path / "restore" / "last.pt")
    assert dest.read_bytes() == ckpt.read_bytes()

    with pytest.raises(ChecksumError, match="failed verification"):
        storage.download_file(stored.key, tmp_path / "other.pt", sha256="f" * 64)
    assert not (tmp_path / "other.pt").exists() and not list(tmp_path.glob(".other.pt*"))


@ON_BOTH_SERVERS
def test_download_refuses_bytes_that_do_not_match_their_sha256(s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="m/model.onnx", Body=b"model", Metadata={"sha256": "0" * 64})
    dest = tmp_path / "model.onnx"

    with pytest.raises(ChecksumError, match=f"s3://{bucket}/m/model.onnx failed verification"):
        storage_for(f"s3://{bucket}/m").download_file("model.onnx", dest)

    assert list(tmp_path.iterdir()) == []


@ON_BOTH_SERVERS
def test_failed_upload_leaves_nothing_and_the_pointer_where_it_was(s3_env, s3, bucket, tmp_path):
    storage = S3Storage(bucket, "ck", transfer=SMALL_PARTS)
    first = storage.upload_file(random_file(tmp_path / "a.pt", 1000), "step-1.pt", pointer="latest.json")
    parts = []

    def fail_third_part(**_):
        parts.append(1)
        if len(parts) == 3:
            raise ConnectionResetError("injected: the network dropped mid-upload")

    storage.client.meta.events.register("before-call.s3.UploadPart", fail_third_part)
    with pytest.raises(ConnectionResetError):
        storage.upload_file(random_file(tmp_path / "b.pt", 40 * MB), "step-2.pt", pointer="latest.json")

    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="ck/step-2.pt")
    if lists_multipart_uploads(s3_env):
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # s3transfer aborted it
    assert storage.read_pointer("latest.json") == first


@ON_BOTH_SERVERS
def test_killed_upload_is_never_the_latest_and_a_retry_succeeds(s3_env, s3, bucket, tmp_path):
    storage = storage_for(f"s3://{bucket}/ck")
    first = storage.upload_file(random_file(tmp_path / "a.pt", 1000), "step-1.pt", pointer="latest.json")
    ckpt = random_file(tmp_path / "b.pt", 40 * MB)
    worker = Path(__file__).with_name("slow_upload.py")
    args = [sys.executable, str(worker), bucket, "ck", str(ckpt), "step-2.pt", "latest.json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:  # kill it once a part has landed: a real multipart upload is half done
        assert proc.stdout.readline() == "part stored\n", "the upload never started"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()

    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="ck/step-2.pt")
    assert storage.read_pointer("latest.json") == first
    if lists_multipart_uploads(s3_env):
        assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1  # the dead one, invisible

    second = storage.upload_file(ckpt, "step-2.pt", pointer="latest.json")  # the retry

    assert storage.read_pointer("latest.json") == second
    if lists_multipart_uploads(s3_env):
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # the dead upload was aborted
    assert storage.download_file("step-2.pt", tmp_path / "restored.pt").read_bytes() == ckpt.read_bytes()


@ON_BOTH_SERVERS
def test_a_part_that_fails_once_is_retried_by_botocore(s3, bucket, tmp_path):
    storage = S3Storage(bucket, "ck", transfer=SMALL_PARTS)
    failures = []

    def drop_once(request, **_):
        if "partNumber=2" in request.url and not failures:
            failures.append(request.url)
            raise ConnectionClosedError(endpoint_url=request.url)  # what a reset connection raises

    storage.client.meta.events.register("before-send.s3.UploadPart", drop_once)
    ckpt = random_file(tmp_path / "c.pt", 12 * MB)

    stored = storage.upload_file(ckpt, "c.pt")

    assert failures, "the failure was never injected"
    assert storage.download_file(stored.key, tmp_path / "back.pt").read_bytes() == ckpt.read_bytes()


# --- presigned URLs -------------------------------------------------------------------------------------------


@ON_BOTH_SERVERS
def test_presigned_url_serves_the_exact_bytes_over_http(s3, bucket, tmp_path):
    storage = storage_for(f"s3://{bucket}/models")
    body = os.urandom(3000)
    storage.upload_file(_write(tmp_path / "m.onnx", body), "m.onnx")

    url = storage.presigned_url("m.onnx", expires_s=90)

    assert urllib.request.urlopen(url, timeout=10).read() == body
    assert expires(url) == "90" and parse_qs(urlparse(url).query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert SECRET_KEY not in url


@ON_BOTH_SERVERS
def test_presigned_url_expiry_defaults_and_limits(s3, bucket, tmp_path, monkeypatch):
    storage = storage_for(f"s3://{bucket}/models")
    storage.upload_file(_write(tmp_path / "m.onnx", b"m"), "m.onnx")
    assert expires(storage.presigned_url("m.onnx")) == "86400"
    monkeypatch.setenv("TRAINYARD_PRESIGNED_URL_EXPIRES_S", "600")
    assert expires(storage_for(f"s3://{bucket}/models").presigned_url("m.onnx")) == "600"
    with pytest.raises(StorageError, match="1 s to 7 days"):
        storage.presigned_url("m.onnx", expires_s=8 * 24 * 3600)
    with pytest.raises(StorageError, match=f"No object at s3://{bucket}/models/missing.onnx"):
        storage.presigned_url("missing.onnx")


@ON_BOTH_SERVERS
def test_expired_presigned_url_is_refused(s3_env, s3, bucket, tmp_path):
    if s3_env.is_moto:
        pytest.skip("moto 5.2.5 does not check presigned URL expiry; the s3rver case does")
    storage = storage_for(f"s3://{bucket}/models")
    storage.upload_file(_write(tmp_path / "m.onnx", b"model"), "m.onnx")
    # 2 s, not 1: the signing time has whole seconds, so a 1 s URL may have expired before its first use.
    url = storage.presigned_url("m.onnx", expires_s=2)
    assert urllib.request.urlopen(url, timeout=10).read() == b"model"

    time.sleep(max(0.0, expiry(url) - time.time()) + 0.5)

    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url, timeout=10)
    assert error.value.code == 403
    assert b"<Code>AccessDenied</Code>" in error.value.read()


# --- layout, configuration and errors -------------------------------------------------------------------------


@ON_BOTH_SERVERS
def test_project_prefixes_isolate_experiments(s3, bucket, tmp_path):
    base = f"s3://{bucket}/trainyard"
    cats, cats_v2 = storage_for(project_prefix(base, "cats")), storage_for(project_prefix(base, "cats-v2"))
    cats.upload_file(_write(tmp_path / "a", b"cats"), "data/x.bin", pointer="latest.json")
    cats_v2.upload_file(_write(tmp_path / "b", b"cats v2"), "data/x.bin", pointer="latest.json")

    synced = cats.sync_to_cache(tmp_path / "cache")

    assert sorted(stats(synced.path)) == ["data/x.bin", "latest.json"]
    assert (synced.path / "data/x.bin").read_bytes() == b"cats"
    assert cats.read_pointer("latest.json").uri == f"{base}/cats/data/x.bin"
    assert cats_v2.read_pointer("latest.json").uri == f"{base}/cats-v2/data/x.bin"
    # Names that are not one safe path segment still get one, distinct per name.
    odd = {project_prefix(base, name) for name in ("Cats vs Dogs", "cats/vs/dogs", "cats vs dogs", "..")}
    assert len(odd) == 4 and all(p.count("/") == base.count("/") + 1 for p in odd)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "Unsupported storage URI 'gs://bucket/x'"),
        ("s3:///prefix", "is not an S3 URI: write s3://bucket/prefix"),
        ("s3://My_Bucket/x", "'My_Bucket' is not an S3 bucket name: 3-63 characters"),
        ("s3://bucket/a/../b", "is not a relative path inside the storage root"),
    ],
)
def test_bad_uris_are_refused_with_the_rule(uri, message):
    with pytest.raises(StorageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        storage_for(uri)


@ON_BOTH_SERVERS
def test_missing_bucket_names_the_bucket_and_the_fix(s3_env, tmp_path):
    storage = storage_for("s3://no-such-bucket-ty/ds")
    with pytest.raises(StorageError, match="Bucket 'no-such-bucket-ty' does not exist .* Create it"):
        storage.sync_to_cache(tmp_path)
    with pytest.raises(StorageError, match="Bucket 'no-such-bucket-ty' does not exist"):
        storage.download_file("x.pt", tmp_path / "x.pt")


def test_missing_credentials_name_where_they_come_from(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        StorageError, match="No S3 credentials found .*AWS_ACCESS_KEY_ID.*TRAINYARD_S3_CREDENTIALS_BLOCK"
    ):
        storage_for("s3://some-bucket/ds").sync_to_cache(tmp_path)


@pytest.fixture(scope="module")
def moto_checking_signatures() -> Iterator[tuple[str, str, str]]:
    """A moto server with authentication on and one IAM user: its URL, the user's access key id and secret.

    It refuses an access key it does not know and, for its user's key, a request signed with another secret."""
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})  # add_iam_user's requests; every later one checked
    try:
        yield url, *add_iam_user(url)
    finally:
        stop(proc)


def refusals(tmp_path: Path) -> list[StorageError]:
    """What an upload and a dataset sync raise with the environment's credentials."""
    storage = storage_for("s3://any-bucket/ck")
    errors = []
    for attempt in (
        lambda: storage.upload_file(_write(tmp_path / "a.pt", b"x"), "a.pt"),
        lambda: storage.sync_to_cache(tmp_path / "cache"),
    ):
        with pytest.raises(StorageError) as error:
            attempt()
        errors.append(error.value)
    return errors


def assert_explained_without_the_secret(errors: list[StorageError], explanation: str, caplog) -> None:
    for error in errors:
        assert explanation in str(error)
        assert "AWS_SECRET_ACCESS_KEY" in str(error) and SECRET_KEY not in str(error)
        assert error.__cause__ is None and error.__suppress_context__  # one line, no boto traceback chain
    assert caplog.records and SECRET_KEY not in caplog.text


@ON_BOTH_SERVERS
def test_an_unknown_access_key_is_explained_without_the_secret(
    s3_env, moto_checking_signatures, monkeypatch, tmp_path, caplog
):
    if s3_env.server == "s3rver":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNKNOWNTOS3RVER")  # it knows only the session's key
    else:  # the session's moto takes any key; the one with authentication on knows only its IAM user's
        monkeypatch.setenv("TRAINYARD_S3_ENDPOINT_URL", moto_checking_signatures[0])
    caplog.set_level(logging.DEBUG)

    errors = refusals(tmp_path)

    assert_explained_without_the_secret(errors, "does not know the access key id from the environment", caplog)


def test_a_wrong_secret_key_is_explained_without_it(s3_env, moto_checking_signatures, monkeypatch, tmp_path, caplog):
    """moto checks the SigV4 signature of a key it knows (s3rver 3.7.1 checks none: it accepts any secret)."""
    url, access_key, _ = moto_checking_signatures
    monkeypatch.setenv("TRAINYARD_S3_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)  # not this key's secret
    caplog.set_level(logging.DEBUG)

    errors = refusals(tmp_path)

    assert_explained_without_the_secret(errors, "rejected the request signature", caplog)
    assert all("does not belong to its access key id" in str(error) for error in errors)


@ON_BOTH_SERVERS
def test_the_secret_never_reaches_logs_pickles_or_reprs(s3, bucket, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's own debug logging included
    put_dataset(s3, bucket, "ds", count=3)
    storage = storage_for(f"s3://{bucket}/ds")
    storage.sync_to_cache(tmp_path)
    stored = storage.upload_file(_write(tmp_path / "m.pt", b"m"), "m.pt", pointer="latest.json")
    url = storage.presigned_url(stored.key)
    errors = []
    for bad in (
        lambda: storage.download_file("missing.pt", tmp_path / "x"),
        lambda: storage_for("s3://nope-ty/x").sync_to_cache(tmp_path),
    ):
        with pytest.raises(StorageError) as error:
            bad()
        errors.append(str(error.value))

    clone = pickle.loads(pickle.dumps(storage))  # what a Prefect result or a subprocess would carry
    assert clone.read_pointer("latest.json") == stored
    for text in (caplog.text, url, repr(storage), stored.to_json(), *errors):
        assert SECRET_KEY not in text
    assert SECRET_KEY.encode() not in pickle.dumps(storage)
    assert "upload" in caplog.text  # the logs were captured at all


def test_credentials_from_a_prefect_block(stack, s3_env, s3, bucket, monkeypatch, tmp_path, caplog):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    name = f"ty-s3-{bucket[-8:]}"
    AwsCredentials(
        aws_access_key_id=s3_env.access_key,
        aws_secret_access_key=s3_env.secret_key,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_env.url),
    ).save(name)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TRAINYARD_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("TRAINYARD_S3_CREDENTIALS_BLOCK", name)
    caplog.set_level(logging.DEBUG)

    storage = storage_for(f"s3://{bucket}/ck")
    stored = storage.upload_file(_write(tmp_path / "m.pt", b"from the block"), "m.pt")

    assert s3.get_object(Bucket=bucket, Key="ck/m.pt")["Body"].read() == b"from the block"
    assert stored.sha256 == hashlib.sha256(b"from the block").hexdigest()
    assert SECRET_KEY not in caplog.text and SECRET_KEY.encode() not in pickle.dumps(storage)
    monkeypatch.setenv("TRAINYARD_S3_CREDENTIALS_BLOCK", "no-such-block")
    with pytest.raises(StorageError, match="Cannot load the Prefect AwsCredentials block 'no-such-block'"):
        storage_for(f"s3://{bucket}/ck").upload_file(tmp_path / "m.pt", "n.pt")


def test_credentials_from_a_prefect_secret_block_for_storage_and_flow_results(
    stack, s3_env, s3, bucket, monkeypatch, tmp_path, caplog
):
    """TRAINYARD_S3_CREDENTIALS_BLOCK=secret/<name>: a Prefect Secret holding the keys as JSON serves the storage and,
    through the S3Bucket block `up` makes from it, the Prefect results; a Secret without the keys is refused by name."""
    from prefect.blocks.system import Secret
    from prefect_aws import S3Bucket

    from infra.settings import RESULTS_BLOCK, Settings
    from infra.stack.services import ensure_result_storage

    name = f"ty-s3-secret-{bucket[-8:]}"
    keys = {"aws_access_key_id": s3_env.access_key, "aws_secret_access_key": s3_env.secret_key}
    Secret(value={**keys, "endpoint_url": s3_env.url}).save(name)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TRAINYARD_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("TRAINYARD_S3_CREDENTIALS_BLOCK", f"secret/{name}")
    caplog.set_level(logging.DEBUG)

    storage = storage_for(f"s3://{bucket}/ck")
    storage.upload_file(_write(tmp_path / "m.pt", b"from the secret"), "m.pt")
    assert s3.get_object(Bucket=bucket, Key="ck/m.pt")["Body"].read() == b"from the secret"

    monkeypatch.setenv("TRAINYARD_ARTIFACT_STORE", f"s3://{bucket}/trainyard")
    ensure_result_storage(Settings.from_env())
    S3Bucket.load(RESULTS_BLOCK).write_path("probe", b"a flow result")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="trainyard/")["Contents"]]
    assert any(key.endswith("/probe") for key in listed), listed
    assert SECRET_KEY not in caplog.text and SECRET_KEY.encode() not in pickle.dumps(storage)

    Secret(value={"aws_access_key_id": s3_env.access_key}).save(f"{name}-half")
    monkeypatch.setenv("TRAINYARD_S3_CREDENTIALS_BLOCK", f"secret/{name}-half")
    with pytest.raises(StorageError, match=r"must hold a JSON object .* it lacks aws_secret_access_key") as refused:
        storage_for(f"s3://{bucket}/ck").upload_file(tmp_path / "m.pt", "n.pt")
    assert s3_env.access_key not in str(refused.value)  # names the keys, never their values


# --- the local backend ----------------------------------------------------------------------------------------


def test_local_storage_round_trip_and_checksum(tmp_path):
    storage = storage_for(str(tmp_path / "store"))
    assert isinstance(storage, LocalStorage) and storage_for(storage.uri).root == storage.root
    stored = storage.upload_file(_write(tmp_path / "m.pt", b"weights"), "ck/m.pt", pointer="ck/latest.json")

    assert storage.read_pointer("ck/latest.json") == stored
    assert storage.download_file("ck/m.pt", tmp_path / "back.pt").read_bytes() == b"weights"
    assert storage.sync_to_cache(tmp_path / "cache").path == storage.root  # used in place, nothing copied
    (storage.root / "ck/m.pt").write_bytes(b"weightz")  # bit rot
    with pytest.raises(ChecksumError, match="does not match its sha256"):
        storage.download_file("ck/m.pt", tmp_path / "again.pt")
    assert not (tmp_path / "again.pt").exists()


def _write(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path
