"""MLflow artifacts in direct mode (TRAINYARD_MLFLOW_ARTIFACTS=direct, docs/scale-out.md): each host writes a run's
artifacts to S3 itself, with its own credentials, and the MLflow server only records where. A host without S3
credentials is told so before it trains, not by boto3 at the first upload deep inside MLflow.
"""

from __future__ import annotations

import os

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class MissingS3Credentials(RuntimeError):
    """This host must write MLflow artifacts to S3 and has nothing to sign the requests with."""


def writes_to_s3(artifact_location: str) -> bool:
    """An s3:// location: MLflow's client writes there itself. Proxied locations are mlflow-artifacts:/..."""
    return artifact_location.startswith("s3://")


def missing_s3_credentials() -> list[str]:
    """The credential variables this host lacks, where boto3 (MLflow's S3 client) finds no credentials anywhere in
    its chain (environment, ~/.aws, an instance role); [] when it finds some."""
    import boto3
    from botocore.exceptions import PartialCredentialsError

    try:
        if boto3.Session().get_credentials() is not None:
            return []
    except PartialCredentialsError:  # one of the two variables set without the other
        pass
    return [name for name in CREDENTIAL_VARIABLES if not os.environ.get(name)] or list(CREDENTIAL_VARIABLES)


def require_s3_credentials(artifact_location: str, context: str) -> None:
    """Raise MissingS3Credentials naming what is missing and both fixes, when this host would write MLflow
    artifacts to `artifact_location` on S3 without credentials. `context` says why it writes there."""
    if not writes_to_s3(artifact_location):
        return
    missing = missing_s3_credentials()
    if missing:
        raise MissingS3Credentials(missing_credentials_message(artifact_location, context, missing))


def missing_credentials_message(artifact_location: str, context: str, missing: list[str]) -> str:
    names = " and ".join(missing)
    return (
        f"{context}: this host writes MLflow artifacts straight to {artifact_location} (direct mode) but has no S3 "
        f"credentials: {names} {'is' if len(missing) == 1 else 'are'} not set, and there is no AWS profile or "
        f"instance role. Set {names} on this host (and TRAINYARD_S3_ENDPOINT_URL for a service other than AWS), "
        "or use proxied artifacts, which need no S3 credentials here: unset TRAINYARD_MLFLOW_ARTIFACTS on every host "
        "and run `python -m infra.stack up --role control` again (an experiment created in direct mode keeps its "
        "S3 location: use a new experiment)"
    )
