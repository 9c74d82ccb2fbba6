"""SQS endpoint authentication: open while no API key exists; once keys exist, requests
need an AWS SigV4 signature made with credentials `sluice keys create --sqs` issued (the
secret derived from SLUICE_SQS_SECRET, never stored), and the key's scopes apply to the
queues' topics."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import asyncpg
import botocore.exceptions
import httpx
import pytest

from sluice.access.sigv4 import derive_secret
from sluice.storage import migrate
from sluice.storage.db import plain_url
from tests.conftest import ROOT, ServerProcess, remove_log
from tests.sqs_support import boto_client, queue_name

SERVER_SECRET = "test-server-secret-0123456789"
NEW_SECRET = "test-server-secret-rotated-9876"


def _cli(url: str, *args: str, secret: str | None = SERVER_SECRET) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"}
    env.pop("SLUICE_SQS_SECRET", None)
    if secret is not None:
        env["SLUICE_SQS_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _credentials(output: str) -> dict[str, str]:
    values = dict(line.split("=", 1) for line in output.strip().splitlines())
    return {
        "aws_access_key_id": values["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": values["AWS_SECRET_ACCESS_KEY"],
        "bearer": values["SLUICE_API_KEY"],
    }


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def keyed(pg_server: str):
    """A database of its own (keys close the API for everyone on it) with a server that
    knows the SQS secret, and one that does not."""
    import asyncio
    import uuid

    from tests.conftest import create_database

    url = asyncio.run(create_database(pg_server, f"sqs_auth_{uuid.uuid4().hex[:8]}"))
    asyncio.run(migrate.upgrade(url))
    server = ServerProcess(url, env={"SLUICE_SQS_SECRET": SERVER_SECRET})
    bare = ServerProcess(url, env={"SLUICE_SQS_SECRET": ""})
    rotating = ServerProcess(
        url, env={"SLUICE_SQS_SECRET": NEW_SECRET, "SLUICE_SQS_PREVIOUS_SECRET": SERVER_SECRET}
    )
    try:
        for proc in (server, bare, rotating):
            proc.wait_ready()
        yield url, server, bare, rotating
    finally:
        for proc in (server, bare, rotating):
            proc.stop()
            remove_log(proc.log_path)


def test_open_until_a_key_exists_then_signatures_and_scopes(keyed):
    url, server, bare, _ = keyed
    endpoint = server.base_url + "/sqs"
    anyone = boto_client(endpoint)
    opened = anyone.create_queue(QueueName=queue_name("open"))["QueueUrl"]

    admin = _cli(url, "keys", "create", "--scope", "admin", "--sqs", "--name", "sqs-admin")
    assert admin.returncode == 0, admin.stderr
    admin_creds = _credentials(admin.stdout)
    assert admin_creds["aws_access_key_id"].startswith("SLU")
    assert len(admin_creds["aws_access_key_id"]) == 20
    # The secret is derived, never stored: no column of the key table holds it.
    publisher = _cli(url, "keys", "create", "--scope", "publish:pub-*", "--sqs")
    assert publisher.returncode == 0, publisher.stderr
    pub_creds = _credentials(publisher.stdout)
    assert pub_creds["aws_secret_access_key"] == derive_secret(
        SERVER_SECRET, pub_creds["aws_access_key_id"]
    )

    async def stored() -> list[str]:
        conn = await asyncpg.connect(plain_url(url))
        try:
            rows = await conn.fetch("SELECT * FROM sluice.api_keys")
        finally:
            await conn.close()
        return [str(v) for row in rows for v in row.values()]

    import asyncio

    everything = asyncio.run(stored())
    assert admin_creds["aws_access_key_id"] in everything
    assert not any(admin_creds["aws_secret_access_key"] in v for v in everything)

    def client(creds: dict[str, str], base: str = endpoint):
        return boto_client(
            base,
            aws_access_key_id=creds["aws_access_key_id"],
            aws_secret_access_key=creds["aws_secret_access_key"],
        )

    # Keys exist: the dummy credentials no longer pass (within the key cache's 2 s).
    deadline = 30
    for _ in range(deadline * 10):
        try:
            anyone.list_queues()
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "InvalidClientTokenId"
            break
        time.sleep(0.1)
    else:
        pytest.fail("the endpoint stayed open after a key was created")

    good = client(admin_creds)
    queue = good.create_queue(QueueName=queue_name("pub"))["QueueUrl"]
    good.send_message(QueueUrl=queue, MessageBody="signed")
    assert good.receive_message(QueueUrl=queue)["Messages"][0]["Body"] == "signed"
    assert opened in good.list_queues(QueueNamePrefix="open-")["QueueUrls"]

    wrong = client({**admin_creds, "aws_secret_access_key": "not-the-secret"})
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        wrong.list_queues()
    assert _code(exc) == "SignatureDoesNotMatch"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    unknown = client({"aws_access_key_id": "SLUAAAAAAAAAAAAAAAAA", "aws_secret_access_key": "x"})
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        unknown.list_queues()
    assert _code(exc) == "InvalidClientTokenId"

    unsigned = httpx.post(
        endpoint,
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "AmazonSQS.ListQueues",
        },
        content=b"{}",
    )
    assert unsigned.status_code == 403
    assert unsigned.json()["__type"].endswith("#MissingAuthenticationToken")

    # Scopes: publish:pub-* may send to pub-* queues, and nothing else.
    limited = client(pub_creds)
    # Looking the queue up comes with any scope on it (producers do it before sending).
    assert limited.get_queue_url(QueueName=queue.rsplit("/", 1)[1])["QueueUrl"] == queue
    limited.send_message(QueueUrl=queue, MessageBody="allowed")
    for call in (
        lambda: limited.receive_message(QueueUrl=queue),
        lambda: limited.create_queue(QueueName=queue_name("pub")),
        lambda: limited.purge_queue(QueueUrl=queue),
        lambda: limited.send_message(QueueUrl=opened, MessageBody="not my queue"),
        lambda: limited.get_queue_url(QueueName=opened.rsplit("/", 1)[1]),
        lambda: limited.list_queue_tags(QueueUrl=queue),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            call()
        assert _code(exc) == "AccessDenied"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    # The native API takes the same key as a bearer token.
    topic = queue.rsplit("/", 1)[1]
    native = httpx.get(
        f"{server.base_url}/v1/topics/{topic}/messages",
        headers={"Authorization": f"Bearer {admin_creds['bearer']}"},
    )
    assert [m["value"] for m in native.json()["messages"]] == ["signed", "allowed"]

    # A server without SLUICE_SQS_SECRET cannot check any SQS signature: refused (once its
    # key cache, up to 2 s old, has seen that keys exist).
    unsigned_by_secret = client(admin_creds, bare.base_url + "/sqs")
    for _ in range(100):
        try:
            unsigned_by_secret.list_queues()
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "InvalidClientTokenId"
            break
        time.sleep(0.1)
    else:
        pytest.fail("a server without SLUICE_SQS_SECRET let a signed request in")


def test_keys_create_sqs_needs_the_server_secret(keyed):
    url, *_ = keyed
    result = _cli(url, "keys", "create", "--scope", "admin", "--sqs", secret=None)
    assert result.returncode == 2
    assert "SLUICE_SQS_SECRET" in result.stderr
    assert result.stdout == ""


def _botocore_signed(secret: str, url: str, body: bytes, when=None):
    """A request signed by botocore's own SigV4Auth (the reference implementation)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "AmazonSQS.ListQueues",
        },
    )
    auth = SigV4Auth(Credentials("SLUTESTKEY0000000000", secret), "sqs", "eu-west-1")
    if when is not None:
        auth._timestamp = lambda: when  # type: ignore[method-assign]
    auth.add_auth(request)
    return request


@pytest.mark.parametrize("url", ["http://h:8000/sqs", "http://h/sqs/000000000000/q?x=1&a=b%20c"])
def test_signatures_match_botocore(url):
    from datetime import UTC, datetime
    from urllib.parse import urlsplit

    from sluice.access.sigv4 import SignatureRefused, check_signature, parse_authorization

    body = b'{"QueueNamePrefix": "x"}'
    request = _botocore_signed("s3cret", url, body)
    headers = [(k.lower(), v) for k, v in request.headers.items()]
    headers.append(("host", urlsplit(url).netloc))
    parts = urlsplit(request.url)
    signed = parse_authorization(request.headers["Authorization"])
    assert signed.region == "eu-west-1" and signed.service == "sqs"
    check_signature(signed, "s3cret", "POST", parts.path, parts.query, headers, body)
    for secret, sent_body in (("other", body), ("s3cret", body + b" ")):
        with pytest.raises(SignatureRefused) as refused:
            check_signature(signed, secret, "POST", parts.path, parts.query, headers, sent_body)
        assert refused.value.refusal == "mismatch"
    with pytest.raises(SignatureRefused) as refused:
        later = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1)
        check_signature(signed, "s3cret", "POST", parts.path, parts.query, headers, body, later)
    assert refused.value.refusal == "expired"
    for header in (None, "Bearer x", "AWS4-HMAC-SHA256 Credential=a/b, Signature=zz"):
        with pytest.raises(SignatureRefused):
            parse_authorization(header)


def test_rotating_the_server_secret(keyed):
    """docs/sqs.md: servers take the new secret with the old one as previous; credentials
    issued under either sign; once the previous one is dropped, only the new ones do."""
    url, server, _, rotating = keyed
    old = _credentials(_cli(url, "keys", "create", "--scope", "admin", "--sqs").stdout)
    new = _credentials(
        _cli(url, "keys", "create", "--scope", "admin", "--sqs", secret=NEW_SECRET).stdout
    )
    assert old["aws_access_key_id"] != new["aws_access_key_id"]

    def client(creds: dict[str, str], base: str):
        return boto_client(
            base + "/sqs",
            aws_access_key_id=creds["aws_access_key_id"],
            aws_secret_access_key=creds["aws_secret_access_key"],
        )

    def call(creds: dict[str, str], base: str) -> str:
        # A new key reaches each server's key cache within a few seconds.
        for _ in range(100):
            try:
                client(creds, base).list_queues()
                return "ok"
            except botocore.exceptions.ClientError as exc:
                code = exc.response["Error"]["Code"]
                if code != "InvalidClientTokenId":
                    return code
            time.sleep(0.1)
        return "InvalidClientTokenId"

    assert call(old, rotating.base_url) == "ok"
    assert call(new, rotating.base_url) == "ok"
    assert call(old, server.base_url) == "ok"
    # A server on the old secret alone (as one whose previous secret was dropped is on the
    # new alone) refuses what the other secret derives.
    assert call(new, server.base_url) == "SignatureDoesNotMatch"
