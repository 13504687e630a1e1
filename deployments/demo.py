"""Trigger the demo training deployment through Prefect, wait for it, and say where everything is.

python -m deployments.demo [deployment name, default train/torch-shapes]
"""

from __future__ import annotations

import sys

from mlflow import MlflowClient
from prefect.deployments import run_deployment

from infra.settings import get_settings
from tasks.report import mlflow_run_url
from tasks.tracking import runs_of_flow_run


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "train/torch-shapes"
    settings = get_settings()
    print(f"Triggering {name} (the worker picks it up within a second)...")
    run = run_deployment(name, timeout=None, tags=["demo"])
    ui = f"{settings.prefect_ui}/runs/flow-run/{run.id}"
    if not run.state or not run.state.is_completed():
        print(f"The run ended {run.state.name if run.state else 'unknown'}: {run.state.message if run.state else ''}")
        print(f"Prefect run: {ui}")
        return 1

    mlflow_run = runs_of_flow_run(run.id)[0]
    client = MlflowClient()
    # search results carry no aliases; read each version itself for them
    versions = [
        client.get_model_version(v.name, v.version)
        for v in client.search_model_versions(f"run_id = '{mlflow_run.info.run_id}'")
    ]
    print("\nDone.")
    print(f"  Prefect run       {ui}")
    print(f"  MLflow run        {mlflow_run_url(mlflow_run.info.run_id)}")
    for version in versions:
        print(f"  Registered model  {version.name} version {version.version} (aliases: {', '.join(version.aliases)})")
    print(f"  ONNX file         {mlflow_run.data.tags.get('onnx.path', '?')}")
    print(f"  Final metrics     {final_metrics(mlflow_run.data.metrics)}")
    return 0


def final_metrics(metrics: dict[str, float]) -> str:
    """The registered model's metrics (its best checkpoint evaluated after training, logged as final_<name>)."""
    # val first, then test (the held-out split, where the dataset has one)
    final = sorted((name for name in metrics if name.startswith("final_")), key=lambda n: ("_test_" in n, n))
    if not final:
        return "none logged (see the MLflow run)"
    return ", ".join(f"{name.removeprefix('final_')} {metrics[name]:.3f}" for name in final)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
