"""S3 credentials from a saved Prefect block instead of the AWS environment.

A team keeps its bucket's key in the Prefect server as an `aws-credentials` block (prefect-aws's
`AwsCredentials`: key id, secret, session token, profile, region, and an endpoint under
`aws_client_parameters.endpoint_url`). `credentials_block: <name>` in a config makes a run use it:
the block's fields are set as the standard AWS variables for the run and restored afterwards, so
every s3:// access (inputs, preflight, publish) goes through the one client setup the environment
already drives. The block is read through Prefect's API, so prefect-aws need not be installed here.
Values never reach a log or a message: only variable names are ever printed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from loram_core.errors import ConfigError

BLOCK_TYPE = "aws-credentials"
_FIELDS = {
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "profile_name": ("AWS_PROFILE",),
    "region_name": ("AWS_DEFAULT_REGION", "AWS_REGION"),
}


def block_environment(name: str) -> dict[str, str]:
    """The AWS environment variables the saved `aws-credentials` block `name` stands for.

    Raises:
        ConfigError: no such block on the server `PREFECT_API_URL` names (or the ephemeral one), or
            one without a key pair or profile; naming the block and the fix.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    where = f"credentials_block={name!r}"
    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE, include_secrets=True)
    except ObjectNotFound:
        raise ConfigError(
            f"{where}: the Prefect server has no {BLOCK_TYPE} block named {name!r}. Create it (prefect-aws's "
            "AwsCredentials, in the UI under Blocks) or unset credentials_block to use the AWS environment."
        ) from None
    data = doc.data or {}
    env = {var: str(data[key]) for key, names in _FIELDS.items() if data.get(key) for var in names}
    endpoint = (data.get("aws_client_parameters") or {}).get("endpoint_url")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = str(endpoint)
    if not ({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys() or "AWS_PROFILE" in env):
        raise ConfigError(
            f"{where}: the block has neither aws_access_key_id and aws_secret_access_key nor profile_name; "
            "fill them in the block (UI: Blocks) or unset credentials_block to use the AWS environment."
        )
    return env


@contextmanager
def aws_environment(name: str | None) -> Iterator[None]:
    """Run the body with the block's AWS variables set, restoring the environment after it.

    With `name` None nothing changes: the AWS environment of the process decides, as always.
    A block replaces the whole key (a key id from the environment is never mixed with a secret from
    the block): every variable the block can set is cleared first.
    """
    if name is None:
        yield
        return
    env = block_environment(name)
    names = {var for names in _FIELDS.values() for var in names} | {"AWS_ENDPOINT_URL"}
    saved = {var: os.environ.get(var) for var in names}
    try:
        for var in names:
            os.environ.pop(var, None)
        os.environ.update(env)
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
