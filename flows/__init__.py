"""Prefect flows (and the `loram` CLI) composing the tasks of `tasks/`."""

import os

# No telemetry from a publisher's pipeline; it also races the ephemeral server's SQLite database.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
