"""A run's S3 credentials from a saved Prefect block (`credentials_block`), read through the API.

The block is read as a plain block document, so prefect-aws need not be installed where the flow
runs; `loram_core.bucket.credentials` turns its fields into the AWS variables for the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loram_core.bucket.credentials import aws_environment, block_environment
from loram_core.errors import ConfigError

BLOCK_TYPE = "aws-credentials"


def read_block(name: str) -> dict[str, Any]:
    """The fields (secrets included) of the saved `aws-credentials` block `name`.

    Raises:
        ConfigError: the server `PREFECT_API_URL` names (or the ephemeral one) has no such block.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE, include_secrets=True)
    except ObjectNotFound:
        raise ConfigError(
            f"credentials_block={name!r}: the Prefect server has no {BLOCK_TYPE} block named {name!r}. Create it "
            "(prefect-aws's AwsCredentials, in the UI under Blocks) or unset credentials_block to use the AWS "
            "environment."
        ) from None
    return doc.data or {}


@contextmanager
def block_credentials(name: str | None) -> Iterator[None]:
    """Run the body with the AWS variables of the block `name` (nothing changes when it is None)."""
    env = None if name is None else block_environment(name, read_block(name))
    with aws_environment(env):
        yield
