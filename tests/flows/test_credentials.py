"""S3 credentials from a saved Prefect `aws-credentials` block: a run whose process has no AWS key
publishes with the block's, the environment comes back unchanged, and a missing or empty block is
refused before any work, naming it and never printing a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loram_core import checks
from loram_core.bucket import verify_version
from loram_core.config import load_config
from loram_core.errors import ConfigError, LoramError
from loram_provider.flows.credentials import BLOCK_TYPE, block_credentials
from tests.flows.test_provider_flow import NO_LIMIT
from tests.s3_server import ACCESS_KEY, SECRET_KEY

REPO = Path(__file__).resolve().parents[2]
KEY_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=NO_LIMIT):
        yield


def _save_block(name: str, data: dict) -> None:
    """What prefect-aws's `AwsCredentials(...).save(name)` stores, made through the plain API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate, BlockSchemaCreate, BlockTypeCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug(BLOCK_TYPE)
        except ObjectNotFound:
            block_type = client.create_block_type(BlockTypeCreate(name="AWS Credentials", slug=BLOCK_TYPE))
        fields = {
            "title": "AwsCredentials",
            "type": "object",
            "properties": {
                k: {"title": k}
                for k in (
                    "aws_access_key_id",
                    "aws_secret_access_key",
                    "region_name",
                    "aws_client_parameters",
                )
            },  # fmt: skip
            "secret_fields": ["aws_secret_access_key"],
            "block_schema_references": {},
        }
        schema = client.create_block_schema(
            BlockSchemaCreate(block_type_id=block_type.id, fields=fields, capabilities=[])
        )
        client.create_block_document(
            BlockDocumentCreate(name=name, block_type_id=block_type.id, block_schema_id=schema.id, data=data)
        )


def test_a_run_without_aws_variables_publishes_with_the_blocks_key(
    prefect_server, s3: str, moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loram_provider.flows.provider import provider
    from tests.flows.test_provider_flow import TINY

    _save_block("team-bucket", {
        "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, "region_name": "us-east-1",
        "aws_client_parameters": {"endpoint_url": moto_server},
    })  # fmt: skip
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(REPO / "configs" / "demo.yaml", [*TINY, f"workdir={tmp_path / 'work'}",
                      f"base.cache_dir={tmp_path / 'cache'}", f"publish.uri={s3}/models", "publish.version=v1",
                      "align.steps=2", "quantize.enabled=false", "verify.enabled=false",
                      "credentials_block=team-bucket"])  # fmt: skip
    with pytest.raises(LoramError, match="no credentials for s3://loram-test"):
        checks.check_publish_target(cfg)  # the process alone cannot reach the bucket
    with block_credentials("team-bucket"):
        assert os.environ["AWS_ENDPOINT_URL"] == moto_server and os.environ["AWS_REGION"] == "us-east-1"
        checks.check_publish_target(cfg)
    assert not any(var in os.environ for var in KEY_VARS)  # restored

    result = provider(cfg)
    assert result["publish"]["status"] == "published"
    assert not any(var in os.environ for var in KEY_VARS)
    with block_credentials("team-bucket"):
        manifest = verify_version(f"{s3}/models/demo-llama")
    assert manifest.version == "v1"
    text = manifest.model_dump_json()
    assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("nowhere", None, "the Prefect server has no aws-credentials block named 'nowhere'"),
        ("keyless", {"region_name": "us-east-1"}, "the block has neither aws_access_key_id"),
        ("half-key", {"aws_secret_access_key": SECRET_KEY}, "the block has neither aws_access_key_id"),
    ],
)
def test_a_missing_or_empty_block_is_refused_naming_it(
    prefect_server, name: str, data: dict | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if data is not None:
        _save_block(name, data)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    with pytest.raises(ConfigError) as err, block_credentials(name):
        pass
    message = str(err.value)
    assert f"credentials_block={name!r}" in message and expected in message and SECRET_KEY not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] == "from-the-environment"  # untouched when refused
