"""`loram deploy`: the work pool, the `gpu` limit, the deployments of prefect.yaml and the
zombie-run automation, created (or updated) on the server `PREFECT_API_URL` names.

prefect.yaml is Prefect's own format (one deployment per preset, schedules with parameters); this
module applies it through the API so that one command, with no interactive prompt, sets up a
team's server, and so that every deployment's config is validated before it is registered.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from loram_core.config import parse_config
from loram_core.errors import ConfigError, LoramError
from loram_provider.tasks._gpu import GPU_LIMIT

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Applied:
    """What `apply` created or updated."""

    api_url: str
    pool: str
    gpu_slots: int
    deployments: list[str]
    automation: str | None


def api_url() -> str:
    """The Prefect API this process talks to, checked reachable.

    Raises:
        LoramError: `PREFECT_API_URL` is unset (deployments need a server) or does not answer.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LoramError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server. Start one "
            "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api (or your server's URL)."
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise LoramError(
            f"PREFECT_API_URL={url!r} does not answer ({type(err).__name__}: {err}); start the server "
            "(`prefect server start`) or fix the URL."
        ) from None
    return url


def read_spec(path: Path) -> dict[str, Any]:
    """prefect.yaml, with every deployment's `config` parameter validated as a `PipelineConfig`.

    Raises:
        ConfigError: the file is missing or malformed, or a deployment's config is invalid.
    """
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass the project's prefect.yaml (--spec).")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    deployments = spec.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise ConfigError(f"{path} has no `deployments:` list.")
    for dep in deployments:
        where = f"{path} deployment {dep.get('name')!r}"
        parse_config((dep.get("parameters") or {}).get("config") or {}, source=where)
        for i, s in enumerate(dep.get("schedules") or []):
            if "config" in (s.get("parameters") or {}):
                parse_config(s["parameters"]["config"], source=f"{where} schedule {i}")
    return spec


def _schedules(dep: dict) -> list:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    out = []
    for s in dep.get("schedules") or []:
        if "cron" not in s:
            raise ConfigError(f"deployment {dep['name']!r}: only cron schedules are supported here ({s}).")
        out.append(
            DeploymentScheduleCreate(
                schedule=CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")),
                active=s.get("active", True),
                parameters=s.get("parameters") or {},
            )
        )
    return out


def apply(
    spec_path: Path,
    gpus: int,
    code_dir: Path,
    only: list[str] | None = None,
    automation: Path | None = None,
) -> Applied:
    """Create or update the work pool, the `gpu` limit, the deployments and the automation.

    Args:
        spec_path: prefect.yaml.
        gpus: slots of the global concurrency limit `gpu` (the GPUs of the host the pool serves).
        code_dir: the checkout the worker runs the flow from (its pull step's working directory).
        only: deployment names to apply (default: all).
        automation: the zombie-run automation file (deploy/zombie-runs.yaml); None skips it.

    Raises:
        LoramError: no reachable server, an invalid spec or deployment config, an unknown name.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from loram_provider.flows.provider import provider

    if gpus < 1:
        raise LoramError(f"--gpus {gpus}: the `gpu` limit needs at least one slot (one per GPU).")
    url = api_url()
    spec = read_spec(spec_path)
    wanted = [d for d in spec["deployments"] if not only or d["name"] in only]
    missing = set(only or []) - {d["name"] for d in wanted}
    if missing:
        known = ", ".join(d["name"] for d in spec["deployments"])
        raise LoramError(f"no deployment named {', '.join(sorted(missing))} in {spec_path}; it has {known}.")
    pools = {d["work_pool"]["name"] for d in wanted}
    schema = parameter_schema(provider.fn).model_dump_for_openapi()
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(code_dir.resolve())}}]
    with get_client(sync_client=True) as client:
        for pool in pools:
            with suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        try:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpus))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpus))
        flow_id = client.create_flow_from_name(provider.name)
        for dep in wanted:
            client.create_deployment(
                flow_id=flow_id,
                name=dep["name"],
                description=dep.get("description"),
                entrypoint=dep["entrypoint"],
                work_pool_name=dep["work_pool"]["name"],
                job_variables=dep["work_pool"].get("job_variables") or {},
                parameters=dep.get("parameters") or {},
                parameter_openapi_schema=schema,
                enforce_parameter_schema=True,
                schedules=_schedules(dep),
                tags=dep.get("tags") or [],
                pull_steps=pull,
            )
    name = apply_automation(automation) if automation is not None else None
    return Applied(url, ", ".join(sorted(pools)), gpus, [d["name"] for d in wanted], name)


def apply_automation(path: Path) -> str:
    """Create the automation a YAML file describes, replacing one of the same name; returns its name."""
    from prefect.automations import Automation

    if not path.is_file():
        raise ConfigError(
            f"automation file {path} does not exist (the project ships deploy/zombie-runs.yaml)."
        )
    automation = Automation.model_validate(yaml.safe_load(path.read_text()))
    with suppress(ValueError):  # ValueError: none of that name yet
        Automation.read(name=automation.name).delete()
    automation.create()
    return automation.name


def default_code_dir() -> Path:
    """The checkout a worker runs deployments from: `LORAM_CODE_DIR`, else this repository."""
    return Path(os.environ.get("LORAM_CODE_DIR", REPO))
