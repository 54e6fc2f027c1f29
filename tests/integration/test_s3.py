"""SeaweedFS as a real S3 server on loopback: the right keys work, wrong keys and anonymous access are refused."""

import boto3
import pytest
from botocore.client import Config
from botocore.exceptions import ClientError

pytestmark = pytest.mark.integration


def client(s3_env: dict[str, str], access_key: str | None = None, secret_key: str | None = None):
    return boto3.client(
        "s3",
        endpoint_url=s3_env["TUNERY_S3_ENDPOINT"],
        aws_access_key_id=access_key or s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret_key or s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_env["AWS_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def test_round_trip_with_the_right_keys(s3_env) -> None:
    s3 = client(s3_env)
    s3.create_bucket(Bucket="roundtrip")
    s3.put_object(Bucket="roundtrip", Key="data/train.jsonl", Body=b'{"text": "hello"}\n')
    body = s3.get_object(Bucket="roundtrip", Key="data/train.jsonl")["Body"].read()
    assert body == b'{"text": "hello"}\n'
    assert [item["Key"] for item in s3.list_objects_v2(Bucket="roundtrip", Prefix="data/")["Contents"]] == [
        "data/train.jsonl"
    ]


def test_a_whole_test_session_of_buckets_accepts_writes(s3_env) -> None:
    s3 = client(s3_env)
    for index in range(40):
        bucket = f"many-{index}"
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="object", Body=bucket.encode())
        assert s3.get_object(Bucket=bucket, Key="object")["Body"].read() == bucket.encode()


def test_wrong_secret_is_refused(s3_env) -> None:
    client(s3_env).create_bucket(Bucket="guarded")
    with pytest.raises(ClientError) as refused:
        client(s3_env, secret_key="not-the-secret").list_objects_v2(Bucket="guarded")
    assert refused.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")


def test_unknown_access_key_is_refused(s3_env) -> None:
    with pytest.raises(ClientError) as refused:
        client(s3_env, access_key="nobody", secret_key="nothing").list_buckets()
    assert refused.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")
