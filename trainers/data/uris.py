"""The shape of an s3:// URI, checked on its text alone: a request is validated before anything connects."""

from __future__ import annotations

import re
from urllib.parse import urlparse

S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def s3_uri_problem(uri: str) -> str | None:
    """What is wrong with the shape of `s3://bucket/prefix`, as the rule it breaks; None when nothing is.

    Looks at the text only (no request): a request is validated before anything connects.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return f"only s3:// URIs are synced, not {parsed.scheme or 'this scheme'}://"
    if not uri.startswith("s3://"):
        return "an S3 URI starts with s3:// (lowercase) followed by the bucket"
    bucket, key = parsed.netloc, parsed.path.removeprefix("/").rstrip("/")
    if parsed.query or parsed.fragment or parsed.params:
        return "an S3 URI has no '?', ';' or '#' part"
    if not S3_BUCKET.match(bucket) or ".." in bucket or _IP.match(bucket):
        return (
            f"{bucket!r} is not an S3 bucket name (3-63 characters: lowercase letters, digits, '.' and '-', starting "
            "and ending with a letter or digit, no '..', not an IP address)"
        )
    parts = key.split("/") if key else []
    if "\\" in key or any(part in ("", ".", "..") for part in parts):
        return f"the prefix {key!r} has an empty, '.' or '..' segment (write s3://bucket/a/b)"
    return None
