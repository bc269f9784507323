"""Deployments as a team runs them: `loram deploy` against a real `prefect server start`, a process
worker, the tiny demo run from a deployment to Completed, and a cancelled torchrun alignment that
leaves no process behind. The server and the worker are subprocesses on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from loram_core import launch
from loram_core.bucket import verify_version
from loram_core.config import load_config, parse_config
from tests.flows.test_provider_flow import REPO, TINY

LORAM = [sys.executable, "-m", "loram_provider.flows.cli"]


def test_every_preset_has_a_deployment_whose_config_is_the_preset() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    fix = "run .venv/bin/python deploy/render_prefect_yaml.py"
    assert set(deployments) == {p.stem for p in (REPO / "configs").glob("*.yaml")}, fix
    for name, dep in deployments.items():
        preset = load_config(REPO / "configs" / f"{name}.yaml")
        assert parse_config(dep["parameters"]["config"]) == preset, f"{name}: {fix}"
        (schedule,) = dep["schedules"]
        assert schedule["cron"] and parse_config(schedule["parameters"]["config"]) == preset, name
        assert dep["entrypoint"] == "flows/provider.py:provider" and dep["work_pool"]["name"] == "loram-gpu"


@pytest.mark.parametrize(
    ("url", "expected"),
    [(None, "PREFECT_API_URL is not set"), ("http://127.0.0.1:9/api", "does not answer")],
)
def test_deploy_without_a_reachable_server_is_a_clear_error(
    tmp_path: Path, url: str | None, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path)})
    if url:
        env["PREFECT_API_URL"] = url
    done = subprocess.run(LORAM + ["deploy"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, logs: tuple[Path, ...] = (), failed=None):
    """Poll `predicate` until it returns something truthy. No clock (a busy machine takes what it takes;
    the suite's overall limit catches a hang): `failed`, when it returns a reason, ends the wait with
    the tails of `logs`."""
    while True:
        value = predicate()
        if value:
            return value
        reason = failed() if failed is not None else None
        if reason:
            tails = "".join(f"\n--- {p} ---\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
            raise AssertionError(f"while waiting for {what}: {reason}{tails}")
        time.sleep(0.5)


def _ended(env: dict, run_id: str, but: str = ""):
    """A `failed` for `_wait`: the run reached a final state (other than `but`)."""
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} - {but}
    return lambda: (s := _state(env, run_id)) in final and f"the run ended {s}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free loopback port, its own PREFECT_HOME; yields the env to reach it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The scheduler looks for new schedules every 5 s (default 60 s), so a schedule's first run is
    # made seconds after it is created.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None and pytest.fail((home / "server.log").read_text()[-3000:])

    _wait(healthy, "the Prefect server (database migration takes 20-60 s here)")
    client_env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home / "client"),
                  "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LORAM_TEST_LOGS": str(home / "server.log")}  # fmt: skip
    try:
        yield client_env
    finally:
        launch.kill_group(proc.pid, grace_s=10)
        log.close()


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory):
    """`loram deploy` then a process worker on the `loram-gpu` pool (one run at a time)."""
    done = subprocess.run(LORAM + ["deploy", "--gpus", "1"], cwd=REPO, env=server, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deployed demo, demo-semi, demo-structured, gpu-1b, llama-3-8b-qloram" in " ".join(
        done.stdout.split()
    )
    cwd = tmp_path_factory.mktemp("worker")
    log = open(cwd / "worker.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "loram-gpu", "--limit", "1"],
        cwd=cwd, env=server, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield {**server, "LORAM_TEST_LOGS": f"{server['LORAM_TEST_LOGS']}{os.pathsep}{cwd / 'worker.log'}"}
    finally:
        launch.kill_group(proc.pid, grace_s=10)
        log.close()


def _logs(env: dict) -> tuple[Path, ...]:
    """The server's and the worker's log files, shown when a wait times out."""
    return tuple(Path(p) for p in env["LORAM_TEST_LOGS"].split(os.pathsep))


def _api(env: dict, method: str, path: str, **kw) -> httpx.Response:
    """One call to the server's REST API; 503 and 429 (a busy SQLite server) retried as Prefect's client does."""
    for attempt in range(6):
        r = httpx.request(method, f"{env['PREFECT_API_URL']}{path}", timeout=None, **kw)
        if r.status_code not in (429, 503):
            break
        time.sleep(2**attempt)
    return r.raise_for_status()


def _run_deployment(env: dict, name: str, config: dict) -> str:
    """What `prefect deployment run` does: a flow run of the deployment with these parameters."""
    dep = _api(env, "GET", f"/deployments/name/loram-provider/{name}").json()
    return _api(
        env, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": {"config": config}}
    ).json()["id"]


def _schedule_soon(env: dict, name: str, config: dict, in_s: float = 15) -> str:
    """What a team does with `prefect deployment schedule create`: a new schedule on the deployment
    whose first run is `in_s` from now and carries `config`. Every other schedule on the server is
    paused first, so the one-run worker takes this run and nothing else. Returns the deployment's id."""
    for dep in _api(env, "POST", "/deployments/filter", json={"limit": 50}).json():
        for s in dep["schedules"]:
            _api(env, "PATCH", f"/deployments/{dep['id']}/schedules/{s['id']}", json={"active": False})
    dep = _api(env, "GET", f"/deployments/name/loram-provider/{name}").json()
    anchor = datetime.now(timezone.utc) + timedelta(seconds=in_s)
    schedule = {"interval": 86400, "anchor_date": anchor.isoformat(), "timezone": "UTC"}
    _api(env, "POST", f"/deployments/{dep['id']}/schedules",
         json=[{"schedule": schedule, "active": True, "parameters": {"config": config}}])  # fmt: skip
    return dep["id"]


def _scheduled_run(env: dict, deployment_id: str, workdir: str) -> str | None:
    """The id of the first run the scheduler made for `deployment_id` whose config has this workdir
    (it makes several ahead, a day apart; the API lists the latest first)."""
    runs = _api(env, "POST", "/flow_runs/filter",
                json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 50}).json()  # fmt: skip
    mine = [r for r in runs if r["auto_scheduled"] and r["parameters"]["config"].get("workdir") == workdir]
    return min(mine, key=lambda r: r["expected_start_time"])["id"] if mine else None


def _state(env: dict, run_id: str) -> str:
    return _api(env, "GET", f"/flow_runs/{run_id}").json()["state"]["type"]


@pytest.mark.slow
def test_deploy_and_a_worker_run_the_demo_from_a_schedule_and_publish(worker, tmp_path: Path) -> None:
    """`loram deploy`, then a schedule on the demo deployment: the server's scheduler makes the run,
    the worker runs it to Completed, it publishes, and its name, tags and artifacts are there."""
    env = worker
    deps = _api(env, "POST", "/deployments/filter", json={"limit": 50}).json()
    assert {d["name"] for d in deps} == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    demo = next(d for d in deps if d["name"] == "demo")
    assert demo["parameter_openapi_schema"]["definitions"]["PipelineConfig"]  # the UI's run form
    assert [s["schedule"]["cron"] for s in demo["schedules"]] == ["0 2 * * *"]
    limits = {
        c["name"]: c["limit"] for c in _api(env, "POST", "/v2/concurrency_limits/filter", json={}).json()
    }
    assert limits["gpu"] == 1
    autos = _api(env, "POST", "/automations/filter", json={}).json()
    assert [a["name"] for a in autos] == ["loram-crash-zombie-runs"]

    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"workdir={tmp_path / 'work'}", f"base.cache_dir={tmp_path / 'cache'}",
        f"publish.uri=file://{tmp_path / 'bucket'}", "publish.version=v1",
    ])  # fmt: skip
    deployment_id = _schedule_soon(env, "demo", cfg.model_dump(mode="json"))
    run_id = _wait(lambda: _scheduled_run(env, deployment_id, str(cfg.workdir)),
                   "the scheduler to make the run", _logs(env))  # fmt: skip
    state = _wait(lambda: (s := _state(env, run_id)) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s,
                  "the scheduled run", _logs(env))  # fmt: skip
    assert state == "COMPLETED"
    assert verify_version(f"file://{tmp_path / 'bucket'}/demo-llama").version == "v1"
    run = _api(env, "GET", f"/flow_runs/{run_id}").json()
    # named after what it makes and the version it pinned (ops.describe_run)
    assert run["name"] == "demo random r=0.65, align 12 steps (12.3k tokens), NF4 -> demo-llama/v1"
    assert "strategy:random" in run["tags"]
    arts = _api(env, "POST", "/artifacts/filter", json={"limit": 50, "offset": 0,
                "artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()  # fmt: skip
    keys = {a["key"] for a in arts}
    assert {
        "pruning-plan",
        "pruning-plan-layers",
        "evaluation",
        "published-version",
        "provider-summary",
    } <= keys


@pytest.mark.slow
def test_cancelling_a_deployed_torchrun_alignment_leaves_no_process(worker, tmp_path: Path) -> None:
    env = worker
    work = tmp_path / "work"
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + [
        f"workdir={work}", f"base.cache_dir={tmp_path / 'cache'}", f"publish.uri=file://{tmp_path / 'bucket'}",
        "align.steps=100000", "align.nproc_per_node=2", "align.parallel=ddp", "align.batch_size=2",
        "align.precision=fp32",
    ])  # fmt: skip
    run_id = _run_deployment(env, "demo", cfg.model_dump(mode="json"))
    registry = work / "pgroups" / run_id
    entry = _wait(
        lambda: next(registry.glob("*.pgid"), None), "the torchrun launch", _logs(env), _ended(env, run_id)
    )
    pgid = int(entry.stem)
    members = _wait(lambda: t if len(t := launch.tree(pgid)) >= 3 else None, "torchrun's two workers",
                    _logs(env), _ended(env, run_id))  # fmt: skip
    _api(env, "POST", f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})
    _wait(
        lambda: _state(env, run_id) == "CANCELLED",
        "the run to be cancelled",
        _logs(env),
        _ended(env, run_id, "CANCELLED"),
    )
    _wait(lambda: not any(launch._alive(pid) for pid in members), "torchrun's processes to go")
    assert (
        json.loads((next(work.glob("align-*.partial")) / "align-config.json").read_text())["nproc_per_node"]
        == 2
    )
