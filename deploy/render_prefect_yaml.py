"""Rewrite prefect.yaml's deployment configs from the presets in configs/ (one deployment per preset).

Each deployment's `config` parameter (and its schedule's) is the preset file as written; schedules,
descriptions and tags already in prefect.yaml are kept. A new preset gets a deployment with a
monthly schedule that ships inactive. tests/flows/test_deploy.py fails when the two drift; then run:
    .venv/bin/python deploy/render_prefect_yaml.py
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "prefect.yaml"
NEW_SCHEDULE = {"cron": "0 4 1 * *", "timezone": "UTC", "active": False}


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def _dump(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=110)


def _preset_description(path: Path) -> str:
    """The preset's first comment line, as the deployment's description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").split(" Run it with")[0].rstrip(":").strip()
    return f"The {path.stem} preset."


def render(spec_text: str) -> str:
    """prefect.yaml with every deployment's config equal to its preset (and one deployment per preset)."""
    header = spec_text[: spec_text.index("name: loram-provider")]
    spec = yaml.safe_load(spec_text)
    existing = {d["name"]: d for d in spec["deployments"]}
    presets = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    order = [n for n in existing if n in presets] + [n for n in presets if n not in existing]
    top = {k: v for k, v in spec.items() if k != "deployments"}
    out = [header, _dump(top), "deployments:\n"]
    for name in order:
        dep = existing.get(name, {})
        preset = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        schedule = {k: v for k, v in (dep.get("schedules") or [NEW_SCHEDULE])[0].items() if k != "parameters"}
        anchor = re.sub(r"\W", "_", name)
        meta = {
            "name": name,
            "description": dep.get("description") or _preset_description(REPO / "configs" / f"{name}.yaml"),
            "entrypoint": "flows/provider.py:provider",
            "tags": dep.get("tags") or ["loram", f"preset:{name}"],
            "work_pool": dep.get("work_pool")
            or {"name": "loram-gpu", "job_variables": {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}},
        }
        state = "active" if schedule.get("active", True) else "ships inactive"
        out.append(f"  # {name}: cron {schedule['cron']} ({state})\n")
        out.append(_indent("- " + _indent(_dump(meta), 2)[2:], 2))
        out.append(f"    parameters:\n      config: &{anchor}\n{_indent(_dump(preset), 8)}")
        out.append("    schedules:\n" + _indent("- " + _indent(_dump(schedule), 2)[2:], 4))
        out.append(f"      parameters:\n        config: *{anchor}\n")
    return "".join(out)


if __name__ == "__main__":
    SPEC.write_text(render(SPEC.read_text()))
    print(f"wrote {SPEC}")
