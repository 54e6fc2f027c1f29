"""The storage-fault test tools against the real SeaweedFS: read-only keys, and FaultyProxy's relay and injected 500s."""

import math
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.client import Config
from botocore.exceptions import ClientError
from fault_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def client(s3_env: dict[str, str], endpoint: str | None = None, reader: bool = False):
    prefix = "TUNERY_S3_READER_" if reader else "AWS_"
    return boto3.client(
        "s3",
        endpoint_url=endpoint or s3_env["TUNERY_S3_ENDPOINT"],
        aws_access_key_id=s3_env[f"{prefix}ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env[f"{prefix}SECRET_ACCESS_KEY"],
        region_name=s3_env["AWS_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture
def proxy(s3_env) -> Iterator[FaultyProxy]:
    with FaultyProxy(s3_env["TUNERY_S3_ENDPOINT"]) as running:
        yield running


def test_the_reader_keys_list_and_get_but_may_not_put(s3_env) -> None:
    client(s3_env).create_bucket(Bucket="read-only")
    client(s3_env).put_object(Bucket="read-only", Key="data/train.jsonl", Body=b'{"text": "hello"}\n')
    reader = client(s3_env, reader=True)
    listed = reader.list_objects_v2(Bucket="read-only", Prefix="data/")["Contents"]
    assert [item["Key"] for item in listed] == ["data/train.jsonl"]
    assert reader.get_object(Bucket="read-only", Key="data/train.jsonl")["Body"].read() == b'{"text": "hello"}\n'
    with pytest.raises(ClientError) as refused:
        reader.put_object(Bucket="read-only", Key="data/new.jsonl", Body=b"{}\n")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        client(s3_env).head_object(Bucket="read-only", Key="data/new.jsonl")


def test_a_multipart_upload_and_download_go_through_the_proxy_unchanged(
    s3_env, proxy: FaultyProxy, tmp_path: Path
) -> None:
    s3 = client(s3_env, endpoint=proxy.endpoint)
    s3.create_bucket(Bucket="proxied")
    original = tmp_path / "model.safetensors"
    original.write_bytes(os.urandom(20 * 1024 * 1024))
    transfer = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_file(str(original), "proxied", "models/model.safetensors", Config=transfer)
    assert s3.head_object(Bucket="proxied", Key="models/model.safetensors")["ContentLength"] == 20 * 1024 * 1024
    copy = tmp_path / "copy.safetensors"
    s3.download_file("proxied", "models/model.safetensors", str(copy), Config=transfer)
    assert copy.read_bytes() == original.read_bytes()
    assert proxy.failed_requests == 0


def test_injected_500s_are_internal_errors_and_the_connection_recovers(s3_env, proxy: FaultyProxy) -> None:
    s3 = client(s3_env, endpoint=proxy.endpoint)
    s3.create_bucket(Bucket="flaky")
    s3.put_object(Bucket="flaky", Key="object", Body=b"payload")
    proxy.fail_for(math.inf)
    with pytest.raises(ClientError) as failed:
        s3.get_object(Bucket="flaky", Key="object")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert failed.value.response["Error"]["Code"] == "InternalError"
    # retries={"max_attempts": 1} is one retry after the first try: both got the 500.
    assert proxy.failed_requests == 2
    with pytest.raises(ClientError) as failed:
        s3.head_object(Bucket="flaky", Key="object")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxy.failed_requests == 4
    proxy.fail_for(0)
    assert s3.get_object(Bucket="flaky", Key="object")["Body"].read() == b"payload"
    assert s3.head_object(Bucket="flaky", Key="object")["ContentLength"] == len(b"payload")
    assert proxy.failed_requests == 4
    assert proxy.connections == 1
