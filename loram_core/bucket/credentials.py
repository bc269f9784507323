"""S3 credentials from a saved credentials block instead of the process's AWS environment.

A team can keep its bucket's key in the Prefect server as an `aws-credentials` block (prefect-aws's
`AwsCredentials`: key id, secret, session token, profile, region, and an endpoint under
`aws_client_parameters.endpoint_url`). The orchestration layer reads the block
(`loram_provider.flows.credentials`); here its fields become the standard AWS variables for the
length of a run and are restored afterwards, so every s3:// access (inputs, preflight, publish) goes
through the one client setup the environment already drives. Values never reach a log or a
message: only variable and field names are ever printed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from loram_core.errors import ConfigError

_FIELDS = {
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "profile_name": ("AWS_PROFILE",),
    "region_name": ("AWS_DEFAULT_REGION", "AWS_REGION"),
}
_VARIABLES = {var for names in _FIELDS.values() for var in names} | {"AWS_ENDPOINT_URL"}


def block_environment(name: str, data: Mapping[str, Any]) -> dict[str, str]:
    """The AWS environment variables the fields of the `aws-credentials` block `name` stand for.

    Raises:
        ConfigError: a block without a key pair or profile, naming the block and the fix.
    """
    env = {var: str(data[key]) for key, names in _FIELDS.items() if data.get(key) for var in names}
    endpoint = (data.get("aws_client_parameters") or {}).get("endpoint_url")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = str(endpoint)
    if not ({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys() or "AWS_PROFILE" in env):
        raise ConfigError(
            f"credentials_block={name!r}: the block has neither aws_access_key_id and aws_secret_access_key "
            "nor profile_name; fill them in the block (UI: Blocks) or unset credentials_block to use the AWS "
            "environment."
        )
    return env


@contextmanager
def aws_environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """Run the body with these AWS variables set, restoring the environment after it.

    With `env` None nothing changes: the AWS environment of the process decides, as always.
    The variables replace the whole key (a key id from the environment is never mixed with a
    secret from a block): every variable a block can set is cleared first.
    """
    if env is None:
        yield
        return
    saved = {var: os.environ.get(var) for var in _VARIABLES}
    try:
        for var in _VARIABLES:
            os.environ.pop(var, None)
        os.environ.update(env)
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
