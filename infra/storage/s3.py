"""S3 and S3-compatible endpoints (MinIO, moto, ...) through boto3.

Settings come from the environment: the endpoint from TRAINYARD_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3,
AWS_ENDPOINT_URL), the region from AWS_REGION / AWS_DEFAULT_REGION, credentials from boto3's own chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), or from the Prefect AwsCredentials block
named by TRAINYARD_S3_CREDENTIALS_BLOCK. Retries are botocore's (standard mode); transfers are s3transfer's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError
from s3transfer.subscribers import BaseSubscriber

from infra.storage.cache import SyncCache
from infra.storage.hashing import HashingFile
from infra.storage.objects import ChecksumError, StorageError, StoredObject, SyncResult, check_key, sha256_file
from infra.storage.s3_errors import translated_errors

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # user metadata key: x-amz-meta-sha256
MAX_PRESIGN_S = 7 * 24 * 3600  # the longest a SigV4 signature is valid
LIST_SPLIT_DEPTH, LIST_SPLIT_WIDTH, LIST_SPLIT_MAX = 2, 8, 32  # parallel listing (see _list)
_TRANSFER_FIELDS = (
    "multipart_threshold", "multipart_chunksize", "max_concurrency", "num_download_attempts", "max_io_queue",
    "io_chunksize", "use_threads", "max_bandwidth",
)  # fmt: skip
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None  # None: AWS itself
    region: str | None = None
    credentials_block: str | None = None  # a Prefect AwsCredentials block name, or secret/<name> for a Secret block
    presign_expires_s: int = 24 * 3600

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        endpoint = env.get("TRAINYARD_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(
            endpoint_url=endpoint or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            credentials_block=env.get("TRAINYARD_S3_CREDENTIALS_BLOCK") or None,
            presign_expires_s=int(env.get("TRAINYARD_PRESIGNED_URL_EXPIRES_S", 24 * 3600)),
        )


class _KnownObject(BaseSubscriber):
    """Hands s3transfer the size and ETag we already have: it skips its own HEAD and pins ranged GETs to the ETag."""

    def __init__(self, size: int, etag: str) -> None:
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)
        future.meta.provide_object_etag(self.etag)


def _expected_digest(head: dict, etag: str, sha256: str | None) -> tuple[str, str] | None:
    """What the downloaded bytes must hash to: a sha256 given or stored in metadata, else the MD5 a plain PUT's ETag is.

    The ETag of a multipart upload, or of an SSE-KMS/SSE-C object, is not an MD5: then only the size is checked.
    """
    if sha256 or head.get("Metadata", {}).get(SHA256_META):
        return "sha256", sha256 or head["Metadata"][SHA256_META]
    etag = etag.strip('"')
    encrypted = head.get("SSECustomerAlgorithm") or str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
    return ("md5", etag) if len(etag) == 32 and "-" not in etag and not encrypted else None


class S3Storage:
    def __init__(
        self, bucket: str, prefix: str = "", settings: S3Settings | None = None, transfer: TransferConfig | None = None
    ) -> None:
        if not _BUCKET.match(bucket):
            raise StorageError(
                f"{bucket!r} is not an S3 bucket name: 3-63 characters, lowercase letters, digits, '.' and '-', "
                "starting and ending with a letter or digit. Fix the bucket in the URI (s3://bucket/prefix)."
            )
        self.bucket, self.prefix = bucket, prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.settings = settings or S3Settings.from_env()
        self.transfer = transfer or TransferConfig()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_uri(cls, uri: str) -> S3Storage:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{uri!r} is not an S3 URI: write s3://bucket/prefix.")
        return cls(parsed.netloc, parsed.path)

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint_url={self.settings.endpoint_url!r})"

    def __getstate__(self) -> dict:
        # Pickled (a Prefect result, a subprocess) without its session: credentials are looked up again where used.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_connection", "client")}
        state["transfer"] = {name: getattr(self.transfer, name) for name in _TRANSFER_FIELDS}  # its defaults are
        return state  # sentinels that do not survive pickling

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, transfer=TransferConfig(**state["transfer"]))

    # --- connection -------------------------------------------------------------------------------------------

    @cached_property
    def _connection(self) -> tuple[boto3.Session, str | None, str]:
        core = botocore.session.get_session()
        # Listings never use LastModified, and dateutil parsing it is a fifth of a 10,000-object listing.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
        kwargs, endpoint = {}, self.settings.endpoint_url
        if self.settings.credentials_block:
            kwargs, block_endpoint = _block_credentials(self.settings.credentials_block)
            endpoint = endpoint or block_endpoint
        session = boto3.Session(botocore_session=core, **kwargs)
        region = self.settings.region or session.region_name or "us-east-1"
        return session, endpoint, region

    @property
    def endpoint_url(self) -> str | None:
        return self._connection[1]

    @cached_property
    def client(self):
        session, endpoint, region = self._connection
        config = Config(
            signature_version="s3v4",  # presigned URLs too: SigV2 is gone from most regions and from MinIO
            retries={"mode": "standard", "total_max_attempts": 5},
            max_pool_connections=max(10, self.transfer.max_request_concurrency),
            s3={"addressing_style": "path"} if endpoint else None,  # MinIO and moto serve buckets as paths
            connect_timeout=10,
            read_timeout=120,
        )
        return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def uri_of(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    # --- operations -------------------------------------------------------------------------------------------

    def upload_file(
        self, path: Path, key: str, *, pointer: str | None = None, sha256: str | None = None
    ) -> StoredObject:
        """Upload with the file's sha256 in its metadata (multipart above the threshold), then write the pointer.

        The object appears at its key only once complete (PUT and CompleteMultipartUpload are atomic), and the
        pointer is written only after that, so a pointer never names a partial object; an upload of this key left
        behind by a killed process is aborted first. Pass sha256 when it is already known (a CheckpointStore
        manifest has it) to skip reading the file twice; a wrong one makes every later download fail verification.
        """
        path, full = Path(path), self._full(key)
        if not path.is_file():
            raise StorageError(f"Cannot upload {path} to {self.uri_of(full)}: there is no such file.")
        stored = StoredObject(key, path.stat().st_size, sha256 or sha256_file(path), self.uri_of(full))
        with translated_errors(self, "upload to", full):
            self._abort_stale_uploads(full)
            with create_transfer_manager(self.client, self.transfer) as manager:
                extra = {"Metadata": {SHA256_META: stored.sha256}}
                manager.upload(str(path), self.bucket, full, extra_args=extra).result()
        log.info("uploaded %s (%d bytes, sha256 %s)", stored.uri, stored.size, stored.sha256[:12])
        if pointer:
            self._write_pointer(pointer, stored)
        return stored

    def download_file(self, key: str, dest: Path, *, sha256: str | None = None) -> Path:
        """Download to dest through a temporary name, verified against sha256 (given, or from the metadata)."""
        full, dest = self._full(key), Path(dest)
        with translated_errors(self, "download", full):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        self._fetch(full, tmp, dest, head["ContentLength"], head["ETag"], head=head, sha256=sha256)
        return dest

    def read_pointer(self, pointer: str) -> StoredObject | None:
        full = self._full(pointer)
        with translated_errors(self, "read the pointer", full):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            except ClientError as error:
                if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return None
                raise
        return StoredObject.from_json(body.decode())

    def presigned_url(self, key: str, expires_s: int | None = None) -> str:
        expires = self.settings.presign_expires_s if expires_s is None else int(expires_s)
        if not 1 <= expires <= MAX_PRESIGN_S:
            raise StorageError(
                f"A presigned URL cannot last {expires} s: S3 signatures last 1 s to 7 days ({MAX_PRESIGN_S} s). "
                "Pass expires_s (or set TRAINYARD_PRESIGNED_URL_EXPIRES_S) within that range."
            )
        full = self._full(key)
        with translated_errors(self, "sign a download URL for", full):
            self.client.head_object(Bucket=self.bucket, Key=full)  # never hand out a URL to nothing
            params = {"Bucket": self.bucket, "Key": full}
            return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    def delete(self, key: str) -> None:
        """Remove the object at key; S3 answers a DELETE of a missing key with success, and so does this."""
        full = self._full(key)
        with translated_errors(self, "delete", full):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def sync_to_cache(self, cache_root: Path) -> SyncResult:
        """Mirror the prefix into `<cache_root>/<bucket>/<prefix>`: one listing, then only changed files move.

        A file is unchanged when the listing's ETag and size match the cache manifest and the local file's size and
        mtime match what was recorded when it was downloaded: no HEAD per object, no re-hashing of local files.
        """
        started = time.perf_counter()
        root = Path(cache_root).expanduser().resolve() / self.bucket / self.prefix
        source = f"{self.settings.endpoint_url or 'aws'} {self.uri}"
        with SyncCache.open(root, source) as cache:
            remote = self._list()
            plan = cache.plan(remote)
            cache.remove(plan.removed)
            with ThreadPoolExecutor(max(1, self.transfer.max_request_concurrency)) as pool:
                jobs = {
                    pool.submit(self._fetch, self._full(rel), cache.temp_path(), root / rel, size, etag): rel
                    for rel, (etag, size) in plan.changed.items()
                }
                failure, corrupt = None, []
                for job in as_completed(jobs):
                    try:
                        cache.record(jobs[job], *remote[jobs[job]], job.result())
                    except ChecksumError as error:  # one bad object: the others still arrive
                        corrupt.append(error)
                    except Exception as error:  # the endpoint or the credentials: stop what has not started
                        failure = failure or error
                        for other in jobs:
                            other.cancel()
            if failure:
                raise failure
            if corrupt:
                more = f" ({len(corrupt) - 1} more objects failed too; the rest are synced)" if len(corrupt) > 1 else ""
                raise ChecksumError(f"{corrupt[0]}{more}")
        result = SyncResult(
            root,
            downloaded=len(plan.changed),
            removed=len(plan.removed),
            unchanged=len(plan.unchanged),
            bytes_downloaded=sum(size for _, size in plan.changed.values()),
            seconds=time.perf_counter() - started,
        )
        log.info(
            "synced %s to %s: %d downloaded (%d bytes), %d removed, %d unchanged in %.2f s",
            self.uri, root, result.downloaded, result.bytes_downloaded, result.removed, result.unchanged,
            result.seconds,
        )  # fmt: skip
        return result

    # --- internals --------------------------------------------------------------------------------------------

    def _list(self) -> dict[str, tuple[str, int]]:
        """Every object under the prefix, relative key -> (ETag, size).

        The top "directory" levels are listed with a delimiter first (at most LIST_SPLIT_DEPTH levels, while a level
        has at most LIST_SPLIT_MAX subdirectories); the subtrees found are then listed in parallel, each with its
        own paginator, so one listing's round trip overlaps another's parsing. A flat prefix is one listing.
        """
        prefix = f"{self.prefix}/" if self.prefix else ""  # the slash: project 'cats' never lists 'cats-v2'
        objects: dict[str, tuple[str, int]] = {}

        def take(page: dict) -> None:
            for obj in page.get("Contents", ()):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):  # "folder" placeholder objects hold no data
                    objects[rel] = (obj["ETag"], obj["Size"])

        def pages(sub: str, **delimiter: str) -> list[dict]:
            paginator = self.client.get_paginator("list_objects_v2")
            return list(paginator.paginate(Bucket=self.bucket, Prefix=sub, **delimiter))

        with translated_errors(self, "list", self.prefix):
            subtrees = [prefix]
            for _ in range(LIST_SPLIT_DEPTH):
                if len(subtrees) >= LIST_SPLIT_WIDTH:
                    break
                deeper = []
                for page in (page for sub in subtrees for page in pages(sub, Delimiter="/")):
                    take(page)  # the files of this level
                    deeper += [common["Prefix"] for common in page.get("CommonPrefixes", ())]
                if len(deeper) > LIST_SPLIT_MAX:  # many small subtrees cost more requests than they save
                    break
                subtrees = deeper
            with ThreadPoolExecutor(max(1, min(LIST_SPLIT_WIDTH, len(subtrees)))) as pool:
                for listed in pool.map(pages, subtrees):
                    for page in listed:
                        take(page)
        if not objects:
            raise StorageError(
                f"No objects under {self.uri}/ at {self.settings.endpoint_url or 'AWS'}: check the prefix (keys are "
                "case-sensitive) or upload the dataset first."
            )
        for rel in objects:
            if ".." in rel.split("/") or rel.startswith("/") or SyncCache.reserved(rel):
                raise StorageError(
                    f"Object {self.uri_of(self._full_unchecked(rel))} cannot be mirrored as a local file (its key has "
                    "'..', a leading '/' or a name Trainyard's cache uses). Rename the object."
                )
        return objects

    def _full_unchecked(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _fetch(
        self, full: str, tmp: Path, dest: Path, size: int, etag: str, *, head: dict | None = None, sha256=None
    ) -> int:
        """Download full into tmp, verify size and checksum, rename to dest; return dest's mtime_ns."""
        try:
            with translated_errors(self, "download", full):
                if head is None and size < self.transfer.multipart_threshold:
                    # Small: one GET, hashed as it streams; the ETag pins it to the version listed.
                    response = self.client.get_object(Bucket=self.bucket, Key=full, IfMatch=etag)
                    expected = _expected_digest(response, etag, sha256)
                    digest = hashlib.new(expected[0]) if expected else None
                    with open(tmp, "wb") as out:
                        for chunk in response["Body"].iter_chunks(1 << 20):
                            out.write(chunk)
                            if digest:
                                digest.update(chunk)
                    actual = digest.hexdigest() if digest else None
                else:
                    # Large: s3transfer's ranged, concurrent GETs, hashed in order as the ranges land.
                    head = head or self.client.head_object(Bucket=self.bucket, Key=full, IfMatch=etag)
                    expected = _expected_digest(head, etag, sha256)
                    target, transferred = HashingFile(tmp, expected[0] if expected else None), False
                    try:
                        with create_transfer_manager(self.client, self.transfer) as manager:
                            manager.download(self.bucket, full, target, subscribers=[_KnownObject(size, etag)]).result()
                        transferred = True
                    finally:
                        actual = target.finish(transferred)
            got = tmp.stat().st_size
            if got != size or (expected and actual != expected[1]):
                what = f"size {size}, got {got}" if got != size else f"{expected[0]} {expected[1]}, got {actual}"
                raise ChecksumError(
                    f"{self.uri_of(full)} failed verification (expected {what}); nothing was written to {dest}. The "
                    "object is corrupt or its stored sha256 is wrong: upload it again."
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            return dest.stat().st_mtime_ns
        finally:
            tmp.unlink(missing_ok=True)

    def _abort_stale_uploads(self, full: str) -> None:
        """Abort multipart uploads of exactly this key left by a killed process (invisible, but they cost storage)."""
        try:
            uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full).get("Uploads", [])
        except ClientError as error:
            if error.response["Error"]["Code"] in ("AccessDenied", "NotImplemented"):
                log.debug("cannot list multipart uploads in %s; a bucket lifecycle rule should abort them", self.bucket)
                return
            raise
        for upload in uploads:
            if upload["Key"] == full:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload["UploadId"])
                log.info("aborted an interrupted upload of %s (started %s)", self.uri_of(full), upload.get("Initiated"))

    def _write_pointer(self, pointer: str, stored: StoredObject) -> None:
        full = self._full(pointer)
        with translated_errors(self, "write the pointer", full):
            body = stored.to_json().encode()
            self.client.put_object(Bucket=self.bucket, Key=full, Body=body, ContentType="application/json")


SECRET_BLOCK = "secret/"  # TRAINYARD_S3_CREDENTIALS_BLOCK=secret/<name>: a Prefect Secret block, not AwsCredentials
SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name", "endpoint_url")


def load_credentials_block(name: str):
    """The prefect_aws AwsCredentials that TRAINYARD_S3_CREDENTIALS_BLOCK names: an AwsCredentials block by its name,
    or `secret/<name>`, a Secret block whose value is a JSON object with aws_access_key_id and aws_secret_access_key
    (optionally aws_session_token, region_name, endpoint_url). Prefect is imported only here."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    kind = "Secret" if name.startswith(SECRET_BLOCK) else "AwsCredentials"
    try:
        if kind == "AwsCredentials":
            return AwsCredentials.load(name)
        from prefect.blocks.system import Secret

        value = Secret.load(name.removeprefix(SECRET_BLOCK)).get()
    except Exception as error:
        raise StorageError(
            f"Cannot load the Prefect {kind} block {name!r} (TRAINYARD_S3_CREDENTIALS_BLOCK): "
            f"{type(error).__name__}. Create it (docs/storage.md: in the UI under Blocks, or in Python), check "
            "PREFECT_API_URL, or unset the variable to use the environment."
        ) from None
    fields = value if isinstance(value, dict) else {}
    missing = [key for key in SECRET_FIELDS[:2] if not fields.get(key)]
    unknown = sorted(set(fields) - set(SECRET_FIELDS))
    if missing or unknown:  # names only: the values are secrets
        raise StorageError(
            f"The Prefect Secret block {name!r} (TRAINYARD_S3_CREDENTIALS_BLOCK) must hold a JSON object with "
            f"{', '.join(SECRET_FIELDS[:2])} (and optionally {', '.join(SECRET_FIELDS[2:])}); "
            + (f"it lacks {', '.join(missing)}" if missing else f"it has unknown keys {', '.join(unknown)}")
            + ". Save it again with those keys."
        )
    return AwsCredentials(
        aws_access_key_id=fields["aws_access_key_id"],
        aws_secret_access_key=fields["aws_secret_access_key"],
        aws_session_token=fields.get("aws_session_token"),
        region_name=fields.get("region_name"),
        aws_client_parameters=AwsClientParameters(endpoint_url=fields.get("endpoint_url")),
    )


def _block_credentials(name: str) -> tuple[dict, str | None]:
    """boto3.Session arguments and endpoint from the Prefect block TRAINYARD_S3_CREDENTIALS_BLOCK names."""
    block = load_credentials_block(name)
    secret = block.aws_secret_access_key.get_secret_value() if block.aws_secret_access_key else None
    kwargs = {
        "aws_access_key_id": block.aws_access_key_id,
        "aws_secret_access_key": secret,
        "aws_session_token": block.aws_session_token,
        "profile_name": block.profile_name,
        "region_name": block.region_name,
    }
    return {k: v for k, v in kwargs.items() if v}, block.aws_client_parameters.endpoint_url
