"""The flow as a team runs it: it validates itself, names and tags its runs, leaves table and link
artifacts, and tells a webhook when it fails. Under a Prefect test server, on the tiny demo config."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from loram_core.config import load_config
from loram_core.errors import LoramError
from tests.flows.test_provider_flow import REPO, TINY, cache, prefect_server  # noqa: F401 - fixtures


def _latest_artifacts(keys: list[str]) -> dict[str, dict]:
    """The newest artifact of each key, through the REST API (this Prefect's client sends filters its
    server refuses)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"key": {"any_": keys}}, "sort": "CREATED_DESC", "limit": 200, "offset": 0}
    rows = (
        httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=None)
        .raise_for_status()
        .json()
    )
    latest: dict[str, dict] = {}
    for row in rows:
        latest.setdefault(row["key"], row)
    return latest


@pytest.fixture
def webhook():
    """A local HTTP server that records the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_bad_bucket_uri_fails_in_the_flows_preflight_before_pruning_and_notifies(
    prefect_server,  # noqa: F811
    tmp_path: Path,
    webhook,
) -> None:
    """A run started as the UI or a schedule starts it (the flow called with the config, no CLI)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from loram_provider.flows.provider import provider

    url, received = webhook
    CustomWebhookNotificationBlock(
        name="loram-test", url=url, json_data={"text": "{{subject}}", "body": "{{body}}"}
    ).save("loram-test", overwrite=True)
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"workdir={tmp_path / 'work'}", "publish.uri=ftp://example.org/models",
        "notify_block=custom-webhook/loram-test",
    ])  # fmt: skip
    with pytest.raises(LoramError, match=r"publish.uri='ftp://example.org/models'"):
        provider(cfg)
    assert not list((tmp_path / "work").glob("prune-*"))  # nothing computed
    name = "demo random r=0.65 -> demo-llama"
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
            sort=FlowRunSort.ID_DESC,
            limit=5,
        )
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            sort=TaskRunSort.ID_DESC,
            limit=50,
        )
    tasks = {t.name.rsplit("-", 1)[0]: t.state.type.value for t in task_runs}
    assert run.state.type.value == "FAILED"
    assert tasks == {"preflight": "FAILED"}  # no prepare_base, no prune
    assert {"loram", "strategy:random", "model:demo", "publish:demo-llama"} <= set(run.tags)
    assert len(received) == 1 and name in received[0]["text"] and "ftp://" in received[0]["body"]


def test_a_run_leaves_plan_evaluation_and_link_artifacts(
    prefect_server,  # noqa: F811
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:

    from loram_provider.flows.provider import provider

    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"workdir={tmp_path / 'work'}", f"base.cache_dir={cache}", "quantize.enabled=false",
        f"publish.uri=file://{tmp_path / 'bucket'}", "publish.version=v1", "prune.ratio=0.5",
    ])  # fmt: skip
    result = provider(cfg)
    keys = ["pruning-plan-layers", "pruning-plan", "evaluation", "published-version"]
    arts = _latest_artifacts(keys)
    assert set(arts) == set(keys) and len({a["flow_run_id"] for a in arts.values()}) == 1
    layers = json.loads(arts["pruning-plan-layers"]["data"])
    # 3 layers, demo.yaml keeps the first and the last: layer 1 loses ceil(128 * 0.5) = 64 channels.
    assert [(row["pruned"], row["intermediate"]) for row in layers] == [
        (False, 128),
        (True, 64),
        (False, 128),
    ]
    summary = {row["quantity"]: row["value"] for row in json.loads(arts["pruning-plan"]["data"])}
    assert summary["pruned parameters"] == f"{result['params']['pruned_params']:,}"
    evaluation = {row["model"] for row in json.loads(arts["evaluation"]["data"])}
    assert evaluation == {"original", "pruned", "aligned"}
    assert arts["published-version"]["data"] == f"[{result['uri']}]({result['uri']})" and result[
        "uri"
    ].endswith("/demo-llama/v1")
    # The model steps get their own section and the run's context, nothing else (the UI lists them).
    inputs = _task_inputs(arts["evaluation"]["flow_run_id"])
    assert inputs["prune"] == {"prune", "ctx", "base_dir", "calib_file"}
    assert inputs["align"] == {"align", "ctx", "pruned_dir", "blocks_file"}
    assert inputs["prepare_calibration"] == {"cfg", "base_dir", "blocks_file"}


def _task_inputs(flow_run_id: str) -> dict[str, set[str]]:
    """Each task of a flow run (by its task name) with the names of the inputs the server recorded."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}
    rows = httpx.post(
        f"{PREFECT_API_URL.value()}/task_runs/filter", json=body, timeout=None
    ).raise_for_status()
    return {row["name"].rsplit("-", 1)[0]: set(row["task_inputs"]) for row in rows.json()}


def test_gpu_slots_are_held_while_a_cuda_step_runs_and_released_on_error(
    prefect_server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    import loram_provider.tasks._gpu as gpu

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(gpu.GPU_LIMIT).active_slots

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=gpu.GPU_LIMIT, limit=2))
    cfg = load_config(REPO / "configs" / "demo.yaml", ["align.nproc_per_node=2"])
    with gpu.gpu_slots(cfg, 2):  # on the CPU: no slot taken
        assert active() == 0
    monkeypatch.setattr(gpu, "compute_device", lambda cfg: torch.device("cuda"))
    monkeypatch.setattr("loram_core.gpus.visible_gpu_count", lambda: 2)
    monkeypatch.setenv("LORAM_GPU_LOCK_DIR", str(tmp_path / "locks"))
    with pytest.raises(RuntimeError, match="out of memory"), gpu.gpu_slots(cfg, 2) as leased:
        assert active() == 2
        assert leased.device == "cuda:0" and cfg.device == "auto"  # the step computes on its leased GPU
        raise RuntimeError("CUDA out of memory")  # what a failing step raises
    assert active() == 0
    ctx = cfg.context.model_copy(update={"device": "cuda:1"})  # pinned: that GPU, and torchrun sees it
    with gpu.gpu_slots(ctx) as leased:
        assert (leased.device, leased.gpus) == ("cuda:1", [1])


KILLED_IN_QUANTIZE = """
import sys, threading
from loram_core.steps import quantization
from loram_core.config import load_config
from loram_provider.flows.provider import provider

def stuck(*args, **kwargs):  # the run stays inside quantize until it is killed, however long that takes
    threading.Event().wait()
quantization.quantize_checkpoint = stuck
provider(load_config("configs/demo.yaml", sys.argv[1:]))
"""


def test_a_run_killed_during_quantize_reruns_without_pruning_or_aligning_again(
    prefect_server,  # noqa: F811
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from loram_provider.flows.provider import provider

    work = tmp_path / "work"
    args = TINY + [f"workdir={work}", f"base.cache_dir={cache}", f"publish.uri=file://{tmp_path / 'bucket'}",
                   "publish.version=v1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    victim = subprocess.Popen([sys.executable, "-c", KILLED_IN_QUANTIZE, *args], cwd=REPO, env=env)
    while not list(work.glob("quantize-*.tmp")):  # no clock: the victim cannot get past quantize
        assert victim.poll() is None, "the run ended before it reached quantize"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = {
        p.parent.name: p.stat().st_mtime_ns
        for p in [*work.glob("prune-*/config.json"), *work.glob("align-*/config.json")]
    }
    assert len(done) == 2 and not list(work.glob("quantize-*/config.json"))
    result = provider(load_config(REPO / "configs" / "demo.yaml", args))
    assert result["uri"].endswith("/demo-llama/v1")
    again = {
        p.parent.name: p.stat().st_mtime_ns
        for p in [*work.glob("prune-*/config.json"), *work.glob("align-*/config.json")]
    }
    assert again == done  # prune and align were found done, not recomputed
    assert list(work.glob("quantize-*/config.json"))
