"""S3 errors as one line each: what failed, why, and the fix; never a secret, never a boto traceback chain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from infra.storage.objects import StorageError

# The infra.storage.s3.S3Storage that failed; not imported, as that module imports this one.
S3Storage = Any

CREDENTIALS_FIX = (
    "Trainyard reads S3 credentials from the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
    "AWS_PROFILE) or from a Prefect AwsCredentials block (or secret/<name>, a Secret block) named by "
    "TRAINYARD_S3_CREDENTIALS_BLOCK; never from flow "
    "parameters."
)


@contextmanager
def translated_errors(storage: S3Storage, action: str, full_key: str) -> Iterator[None]:
    """Turn boto errors into one StorageError line: what failed, why, and the fix; secrets scrubbed."""
    where = storage.uri_of(full_key) if full_key else storage.uri
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except NoCredentialsError:
        raise StorageError(f"No S3 credentials found to {action} {where}. {CREDENTIALS_FIX} Set one.") from None
    except EndpointConnectionError as error:
        raise StorageError(
            f"Cannot reach the S3 endpoint {error.kwargs.get('endpoint_url')} to {action} {where}. Check that the "
            "server is up, and TRAINYARD_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) for MinIO or another S3 service."
        ) from None
    except ClientError as error:
        raise StorageError(scrub(storage, explain(storage, error, action, where))) from None
    except BotoCoreError as error:
        raise StorageError(scrub(storage, f"S3 could not {action} {where}: {error}")) from None


def explain(storage: S3Storage, error: ClientError, action: str, where: str) -> str:
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    endpoint = storage.endpoint_url or "AWS"
    source = credentials_source(storage)
    if code in ("404", "NotFound", "NoSuchKey") and bucket_exists(storage) is False:
        code = "NoSuchBucket"
    if code == "NoSuchBucket":
        return (
            f"Bucket {storage.bucket!r} does not exist at {endpoint} (trying to {action} {where}). Create it "
            f"(aws s3 mb s3://{storage.bucket}) or fix the bucket in the URI."
        )
    if code in ("404", "NotFound", "NoSuchKey"):
        return f"No object at {where} on {endpoint}. Check the key, or upload it first."
    if code in ("InvalidAccessKeyId", "InvalidClientTokenId"):
        return (
            f"{endpoint} does not know the access key id from {source} (trying to {action} {where}). Fix the "
            f"credentials there. {CREDENTIALS_FIX}"
        )
    if code == "SignatureDoesNotMatch":
        return (
            f"{endpoint} rejected the request signature (trying to {action} {where}): the secret access key from "
            f"{source} does not belong to its access key id. Fix the secret there."
        )
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        return f"The session token from {source} has expired (trying to {action} {where}). Refresh it."
    if code in ("AccessDenied", "403", "Forbidden"):
        return (
            f"Access denied to {action} {where} with the credentials from {source}. Grant them access to "
            f"arn:aws:s3:::{storage.bucket}/{storage.prefix}* (List, Get, Put, AbortMultipartUpload), or use others."
        )
    if code == "PreconditionFailed":
        return f"{where} changed while it was being downloaded. Run again to fetch the new version."
    return f"S3 refused to {action} {where} ({code}: {message})."


def bucket_exists(storage: S3Storage) -> bool | None:
    try:
        storage.client.head_bucket(Bucket=storage.bucket)
        return True
    except ClientError as error:
        return False if error.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket") else None
    except BotoCoreError:
        return None


def credentials_source(storage: S3Storage) -> str:
    if storage.settings.credentials_block:
        name = storage.settings.credentials_block
        return f"the Prefect {'Secret' if name.startswith('secret/') else 'AwsCredentials'} block {name!r}"
    credentials = storage._connection[0].get_credentials()
    method = getattr(credentials, "method", "")
    return {"env": "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"}.get(method, f"boto3 ({method})")


def scrub(storage: S3Storage, text: str) -> str:
    """Belt and braces: no server message may carry a secret into an exception."""
    if "_connection" not in vars(storage):
        return text
    credentials = storage._connection[0].get_credentials()
    frozen = credentials.get_frozen_credentials() if credentials else None
    for secret in (frozen.secret_key, frozen.token) if frozen else ():
        if secret:
            text = text.replace(secret, "***")
    return text
