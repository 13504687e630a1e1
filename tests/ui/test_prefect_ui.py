"""The Prefect UI renders Trainyard's artifacts: headless Chromium opens the pages of a training run and of a monitor
run, and text that only the artifacts' data holds (a GPU's name, its holder, a metric's value, the MLflow run) is on
the rendered page, not only in the API's answers. Screenshots are kept (the path is printed at the end of the run).

The run pages are opened in the UI's v2 (`/v2/runs/flow-run/<id>?tab=Artifacts`): the default UI drops the `tab`
of a deep link while the run loads. Artifact pages are opened in the default UI.
"""

from __future__ import annotations

import json
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

from flows.monitor import monitor
from flows.train import train
from infra.compute.allocation import Need, gpu_lease, publish_inventory
from infra.compute.gpus import GPU, HostInventory


def artifacts_of(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return {artifact.key: artifact for artifact in found}


@pytest.fixture(scope="module")
def monitored(stack):
    """A monitor run that saw a host with one GPU, held by this process (no GPU here: the inventory is supplied)."""
    tag = uuid.uuid4().hex[:8]
    gpu = GPU(0, f"GPU-{tag}", f"UI Test GPU {tag}", 16384, 2048, 37, 61, 150.0, ())
    host = HostInventory(f"uihost-{tag}", 8, 4, 32.0, 30.0, 100.0, (gpu,), "test", "")
    publish_inventory(host)
    with gpu_lease(Need(gpus=1), host, set_visible=False):
        state = monitor(return_state=True)
    assert state.is_completed(), state.message
    return host, state.state_details.flow_run_id


@pytest.fixture(scope="module")
def trained(stack, shapes_cls):
    state = train(
        dataset=str(shapes_cls), experiment="ui-tests", epochs=2, batch_size=8, image_size=32, return_state=True
    )
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id


def test_the_monitor_run_page_lists_its_tables_and_the_gpu_table_renders_name_and_holder(monitored, stack, browse):
    host, flow_run_id = monitored
    artifacts = artifacts_of(flow_run_id)
    keys = ("trainyard-monitor", "trainyard-monitor-pools", "trainyard-monitor-queue")
    page = browse(f"{stack.prefect_ui}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts", "monitor-run", keys)
    assert all(key in page for key in keys)
    assert artifacts["trainyard-monitor"].description.split(" (")[0] in page  # the card's description

    [row] = [r for r in json.loads(artifacts["trainyard-monitor"].data) if r["host"] == host.hostname]
    expect = (host.gpus[0].name, row["holders"])
    page = browse(f"{stack.prefect_ui}/artifacts/artifact/{artifacts['trainyard-monitor'].id}", "monitor-gpus", expect)
    assert host.gpus[0].name in page
    assert row["holders"].startswith(host.hostname) and row["holders"] in page  # "<host> (pid N, 16 GiB)"


def test_the_training_run_page_lists_its_artifacts_and_metrics_and_summary_render(trained, stack, browse):
    summary, flow_run_id = trained
    artifacts = artifacts_of(flow_run_id)
    keys = ("dataset-stats", "compute-decision", "training-progress", "final-metrics", "training-summary")
    page = browse(f"{stack.prefect_ui}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts", "training-run", keys)
    assert all(key in page for key in keys)

    [metric] = [r for r in json.loads(artifacts["final-metrics"].data) if r["metric"] == "val_loss"]
    shown = f"{metric['value']:.6f}".rstrip("0").rstrip(".")  # how a JSON number (rounded to 6 places) is displayed
    url = f"{stack.prefect_ui}/artifacts/artifact/{artifacts['final-metrics'].id}"
    page = browse(url, "training-metrics", ("val_loss", shown))
    assert "val_loss" in page and shown in page

    summary_page = browse(
        f"{stack.prefect_ui}/artifacts/artifact/{artifacts['training-summary'].id}",
        "training-summary",
        (summary.mlflow_run_id,),
    )
    assert summary.mlflow_run_id in summary_page and summary.model_name in summary_page
