"""docker/ checked with what runs here (no Docker engine): the compose file's wiring, the images'
build context and pins. `hadolint` and `check-jsonschema --builtin-schema vendor.compose-spec` ran
on these files too (README, "Docker")."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {n.lower().replace("_", "-"): v for n, _, v in (ln.partition("==") for ln in lines if "==" in ln)}


def test_constraints_pin_the_tested_torch_and_every_direct_dependency() -> None:
    pins = _pins()
    assert pins["torch"] == "2.13.0" and "loram-provider" not in pins
    text = (REPO / "pyproject.toml").read_text()
    deps = re.findall(r'^\s*"([A-Za-z0-9_.-]+)[<>=\[]', text.split("[project.scripts]")[0], re.M)
    assert deps and all(d.lower().replace("_", "-") in pins for d in deps), [
        d for d in deps if d.lower() not in pins
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_the_tested_torch_with_the_constraints(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs)
    assert any("torch==2.13.0" in ln for ln in installs)
    ignored = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), (
                    src,
                    "excluded by .dockerignore",
                )


def test_dockerignore_keeps_venvs_state_and_caches_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".loram", "bucket", ".git", "**/__pycache__", ".prefect-home"} <= ignored


def test_makefile_installs_with_the_constraints() -> None:
    installs = [
        ln
        for ln in (REPO / "Makefile").read_text().splitlines()
        if "pip install" in ln and "upgrade" not in ln
    ]
    assert installs and all("-c constraints.txt" in ln for ln in installs)


def test_compose_wires_server_worker_store_bucket_and_volumes() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prefect", "minio", "bucket", "deploy", "worker"} <= set(services)
    for name, svc in services.items():
        assert set(svc.get("depends_on", {})) <= set(services), name
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in compose["volumes"], (name, vol)  # named volumes, declared
    assert "mb" in services["bucket"]["entrypoint"] and "local/loram" in services["bucket"]["entrypoint"]
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    assert "loram-gpu" in worker["entrypoint"]  # the pool `loram deploy` creates (prefect.yaml)
    assert services["deploy"]["command"][0] == "deploy"
