"""The SQS-compatible endpoint (JSON protocol): POST /sqs with `X-Amz-Target:
AmazonSQS.<Action>` and an `application/x-amz-json-1.0` body, what boto3 and the AWS CLI
send. This module only parses, authenticates, dispatches and serialises; the queue
semantics are app.queue.sqs_queues and app.queue.sqs_messages (docs/sqs.md).

Not part of the OpenAPI document: it is AWS's API, documented by AWS (and docs/sqs.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, Request, Response

from sluice.access.keys import KeyCache, Principal
from sluice.access.scopes import Kind, Reach, Requirement, satisfies
from sluice.access.sigv4 import (
    Refusal,
    SignatureRefused,
    check_signature,
    derive_secret,
    parse_authorization,
)
from sluice.api import sqs_query
from sluice.api.deps import ctx_of
from sluice.api.disconnect import watch_disconnect
from sluice.errors import SluiceError
from sluice.queue import sqs_messages as messages
from sluice.queue import sqs_queues as queues
from sluice.queue.context import QueueContext
from sluice.queue.sqs_errors import (
    SqsError,
    invalid_parameter,
    missing_parameter,
    unavailable,
    unsupported_operation,
)
from sluice.records import SqsQueue

log = logging.getLogger("sluice.sqs")

router = APIRouter(include_in_schema=False)

MEDIA_TYPE = "application/x-amz-json-1.0"
TARGET_PREFIX = "AmazonSQS."
# Actions of SQS that Sluice does not offer (UnsupportedOperation, not InvalidAction).
UNSUPPORTED = frozenset(
    {
        "AddPermission",
        "RemovePermission",
        "StartMessageMoveTask",
        "CancelMessageMoveTask",
        "ListMessageMoveTasks",
    }
)


class SqsResponse(Response):
    media_type = MEDIA_TYPE


def _answer(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None):
    all_headers = {"x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}
    return SqsResponse(orjson.dumps(body), status_code=status, headers=all_headers)


def error_response(error: SqsError) -> Response:
    fault = "Sender" if error.sender_fault else "Receiver"
    return _answer(
        {"__type": f"com.amazonaws.sqs#{error.name}", "message": error.message},
        error.status,
        {"x-amzn-query-error": f"{error.legacy};{fault}"},
    )


# ---- the call: parameters, the caller's key ------------------------------------------------


@dataclass
class Call:
    request: Request
    ctx: QueueContext
    params: dict[str, Any]
    principal: Principal | None  # None: no key exists, the endpoint is open
    access_key_id: str | None

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.params.get(name)
        if value is None or value == "":
            if required:
                raise missing_parameter(name)
            return None
        if not isinstance(value, str):
            raise invalid_parameter(f"{name} must be a string.")
        return value

    def items(self, name: str) -> list[Any]:
        value = self.params.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise invalid_parameter(f"{name} must be a list.")
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.params.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise invalid_parameter(f"{name} must be a map.")
        return value

    def allow(self, kind: Kind | tuple[Kind, ...], queue_name: str | None = None) -> None:
        """AccessDenied unless the key has the scope (one of them) on the queue's topic."""
        if self.principal is None:
            return
        needs = []
        for one in kind if isinstance(kind, tuple) else (kind,):
            if one == Kind.admin:
                needs.append(Requirement(one))
            elif queue_name is None:
                needs.append(Requirement(one, Reach.any))
            else:
                needs.append(Requirement(one, Reach.topic, queues.topic_of(queue_name)))
        if not any(satisfies(self.principal.scopes, need) for need in needs):
            wanted = " or ".join(str(need) for need in needs)
            raise SqsError(
                "AccessDenied",
                f"Access to the resource is denied: the key needs {wanted} or admin.",
                status=403,
            )

    def visible(self) -> Callable[[str], bool] | None:
        """Which topics the key may read (listings), None for all."""
        principal = self.principal
        if principal is None or satisfies(principal.scopes, Requirement(Kind.read, Reach.all)):
            return None
        scopes = principal.scopes
        return lambda topic: satisfies(scopes, Requirement(Kind.read, Reach.topic, topic))

    async def queue(self, kind: Kind | tuple[Kind, ...]) -> SqsQueue:
        """The queue of QueueUrl, once the key may act on it with `kind`."""
        name = queues.queue_name_of_url(self.text("QueueUrl") or "")
        self.allow(kind, name)
        return await queues.get_queue(self.ctx, name)

    @property
    def base_url(self) -> str:
        return str(self.request.base_url)

    @property
    def sender(self) -> str:
        return self.access_key_id or self.ctx.settings.sqs_account_id


# ---- actions -------------------------------------------------------------------------------

# Any scope on a queue may look it up: producers and consumers call GetQueueUrl and
# GetQueueAttributes before they send or receive.
ANY_USE = (Kind.read, Kind.publish, Kind.consume)


async def create_queue(call: Call) -> dict[str, Any]:
    name = call.text("QueueName") or ""
    call.allow(Kind.admin)
    queue = await queues.create_queue(
        call.ctx, name, call.mapping("Attributes"), call.mapping("tags")
    )
    return {"QueueUrl": queues.url_of(call.ctx, call.base_url, queue.name)}


async def get_queue_url(call: Call) -> dict[str, Any]:
    name = call.text("QueueName") or ""
    call.allow(ANY_USE, name)
    queue = await queues.get_queue(call.ctx, name)
    return {"QueueUrl": queues.url_of(call.ctx, call.base_url, queue.name)}


def _max_results(call: Call) -> int | None:
    value = call.params.get("MaxResults")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise invalid_parameter("Value for parameter MaxResults is invalid: must be 1..1000.")
    return value


async def list_queues(call: Call) -> dict[str, Any]:
    call.allow(Kind.read)
    page = await queues.list_queues(
        call.ctx,
        call.text("QueueNamePrefix", required=False) or "",
        _max_results(call),
        call.text("NextToken", required=False),
        call.visible(),
    )
    answer: dict[str, Any] = {}
    if page.names:
        answer["QueueUrls"] = [queues.url_of(call.ctx, call.base_url, n) for n in page.names]
    if page.next_token:
        answer["NextToken"] = page.next_token
    return answer


async def delete_queue(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.admin)
    await queues.delete_queue(call.ctx, queue.name)
    return {}


async def get_queue_attributes(call: Call) -> dict[str, Any]:
    queue = await call.queue(ANY_USE)
    names = [str(n) for n in call.items("AttributeNames")]
    if not names:
        return {}
    attributes = await queues.get_attributes(call.ctx, queue.name, names)
    return {"Attributes": attributes} if attributes else {}


async def set_queue_attributes(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.admin)
    if "Attributes" not in call.params:
        raise missing_parameter("Attributes")
    await queues.set_attributes(call.ctx, queue.name, call.mapping("Attributes"))
    return {}


async def purge_queue(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.admin)
    await queues.purge(call.ctx, queue.name)
    return {}


async def tag_queue(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.admin)
    tags = call.mapping("Tags")
    if not tags:
        raise missing_parameter("Tags")
    await queues.tag(call.ctx, queue.name, tags)
    return {}


async def untag_queue(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.admin)
    await queues.untag(call.ctx, queue.name, [str(k) for k in call.items("TagKeys")])
    return {}


async def list_queue_tags(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.read)
    return {"Tags": queue.tags} if queue.tags else {}


async def list_dead_letter_source_queues(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.read)
    names = await queues.dead_letter_sources(call.ctx, queue.name, call.visible())
    return {"queueUrls": [queues.url_of(call.ctx, call.base_url, n) for n in names]}


def _send_request(entry: dict[str, Any]) -> messages.SendRequest:
    return messages.SendRequest(
        body=entry.get("MessageBody"),
        delay_seconds=entry.get("DelaySeconds"),
        attributes=entry.get("MessageAttributes"),
        system_attributes=entry.get("MessageSystemAttributes"),
        group_id=entry.get("MessageGroupId"),
        dedup_id=entry.get("MessageDeduplicationId"),
    )


def _sent(sent: messages.Sent) -> dict[str, Any]:
    answer: dict[str, Any] = {"MessageId": sent.message_id, "MD5OfMessageBody": sent.md5_body}
    if sent.md5_attributes:
        answer["MD5OfMessageAttributes"] = sent.md5_attributes
    if sent.sequence_number:
        answer["SequenceNumber"] = sent.sequence_number
    return answer


async def send_message(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.publish)
    prepared = messages.prepare(queue, _send_request(call.params), call.sender)
    (sent,) = await messages.send(call.ctx, queue, [prepared])
    return _sent(sent)


def _entries(call: Call, name: str) -> list[dict[str, Any]]:
    entries = call.items(name)
    if not all(isinstance(e, dict) for e in entries):
        raise invalid_parameter(f"{name} must be a list of structures.")
    messages.check_batch_ids([e.get("Id") for e in entries])
    return entries


def _failed(failures: list[messages.BatchFailure]) -> list[dict[str, Any]]:
    return [
        {"Id": f.id, "SenderFault": f.sender_fault, "Code": f.code, "Message": f.message}
        for f in failures
    ]


async def send_message_batch(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.publish)
    entries = _entries(call, "Entries")
    done, failed = await messages.send_batch(
        call.ctx, queue, [(e["Id"], _send_request(e)) for e in entries], call.sender
    )
    return {
        "Successful": [{"Id": entry_id, **_sent(sent)} for entry_id, sent in done],
        "Failed": _failed(failed),
    }


async def receive_message(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.consume)
    system = [str(n) for n in call.items("AttributeNames")]
    system += [str(n) for n in call.items("MessageSystemAttributeNames")]
    request = messages.receive_request(
        queue,
        call.params.get("MaxNumberOfMessages"),
        call.params.get("WaitTimeSeconds"),
        call.params.get("VisibilityTimeout"),
        dict.fromkeys(system),
        [str(n) for n in call.items("MessageAttributeNames")],
    )
    async with watch_disconnect(call.request, enabled=request.wait_seconds > 0) as gone:
        received = await messages.receive(call.ctx, queue, request, gone)
    out = []
    for m in received:
        item: dict[str, Any] = {
            "MessageId": m.message_id,
            "ReceiptHandle": m.receipt_handle,
            "MD5OfBody": m.md5_body,
            "Body": m.body,
        }
        if m.attributes:
            item["Attributes"] = m.attributes
        if m.message_attributes:
            item["MessageAttributes"] = m.message_attributes
            item["MD5OfMessageAttributes"] = m.md5_attributes
        out.append(item)
    return {"Messages": out} if out else {}


async def delete_message(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.consume)
    handle = messages.check_handle(call.params.get("ReceiptHandle"))
    await messages.delete(call.ctx, queue, [handle])
    return {}


async def delete_message_batch(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.consume)
    entries = _entries(call, "Entries")
    done, failed = await messages.delete_batch(
        call.ctx, queue, [(e["Id"], e.get("ReceiptHandle")) for e in entries]
    )
    return {"Successful": [{"Id": i} for i in done], "Failed": _failed(failed)}


async def change_message_visibility(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.consume)
    handle = messages.check_handle(call.params.get("ReceiptHandle"))
    seconds = messages.check_visibility(call.params.get("VisibilityTimeout"))
    if await messages.change_visibility(call.ctx, queue, [handle], seconds):
        raise messages.message_not_inflight()
    return {}


async def change_message_visibility_batch(call: Call) -> dict[str, Any]:
    queue = await call.queue(Kind.consume)
    entries = _entries(call, "Entries")
    done, failed = await messages.change_visibility_batch(
        call.ctx,
        queue,
        [(e["Id"], e.get("ReceiptHandle"), e.get("VisibilityTimeout")) for e in entries],
    )
    return {"Successful": [{"Id": i} for i in done], "Failed": _failed(failed)}


ACTIONS: dict[str, Callable[[Call], Awaitable[dict[str, Any]]]] = {
    "CreateQueue": create_queue,
    "GetQueueUrl": get_queue_url,
    "ListQueues": list_queues,
    "DeleteQueue": delete_queue,
    "GetQueueAttributes": get_queue_attributes,
    "SetQueueAttributes": set_queue_attributes,
    "PurgeQueue": purge_queue,
    "TagQueue": tag_queue,
    "UntagQueue": untag_queue,
    "ListQueueTags": list_queue_tags,
    "ListDeadLetterSourceQueues": list_dead_letter_source_queues,
    "SendMessage": send_message,
    "SendMessageBatch": send_message_batch,
    "ReceiveMessage": receive_message,
    "DeleteMessage": delete_message,
    "DeleteMessageBatch": delete_message_batch,
    "ChangeMessageVisibility": change_message_visibility,
    "ChangeMessageVisibilityBatch": change_message_visibility_batch,
}


# ---- authentication ------------------------------------------------------------------------

_REFUSALS = {
    Refusal.missing: "MissingAuthenticationToken",
    Refusal.malformed: "IncompleteSignature",
    Refusal.unknown_key: "InvalidClientTokenId",
    Refusal.mismatch: "SignatureDoesNotMatch",
    Refusal.expired: "SignatureDoesNotMatch",
}


async def _authenticate(request: Request, body: bytes) -> tuple[Principal | None, str | None]:
    """(key, access key id) of a correctly signed request; (None, None) while no API key
    exists (the endpoint is open like the rest of the API)."""
    cache: KeyCache = request.app.state.keys
    snapshot = await cache.current()
    if snapshot.open:
        return None, None
    try:
        signed = parse_authorization(request.headers.get("authorization"))
        principal = snapshot.by_sqs_access_key.get(signed.access_key_id)
        server_secret = request.app.state.settings.sqs_secret
        if principal is None or not server_secret:
            if principal is not None:
                log.warning("SQS credentials cannot be checked: SLUICE_SQS_SECRET is not set")
            raise SignatureRefused(
                Refusal.unknown_key, "The security token included in the request is invalid."
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        previous = request.app.state.settings.sqs_previous_secret
        # While the server secret rotates, secrets derived from the previous one still sign.
        candidates = [server_secret, *([previous] if previous else [])]
        for index, candidate in enumerate(candidates):
            try:
                check_signature(
                    signed,
                    derive_secret(candidate, signed.access_key_id),
                    request.method,
                    request.url.path,
                    request.url.query,
                    headers,
                    body,
                )
                break
            except SignatureRefused as refused:
                if refused.refusal != Refusal.mismatch or index == len(candidates) - 1:
                    raise
    except SignatureRefused as refused:
        raise SqsError(_REFUSALS[refused.refusal], refused.detail, status=403) from None
    return principal, signed.access_key_id


# ---- the endpoint --------------------------------------------------------------------------


def _is_query_protocol(request: Request) -> bool:
    """Older SDKs send `Action=...` as a form (the query protocol) and read XML."""
    content_type = request.headers.get("content-type", "")
    return content_type.startswith("application/x-www-form-urlencoded")


def _json_call(request: Request, body: bytes) -> tuple[str, dict[str, Any]]:
    target = request.headers.get("x-amz-target", "")
    action = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
    if action not in ACTIONS:
        return action or target, {}
    try:
        params = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        raise SqsError("SerializationException", "The request body is not JSON.") from None
    if not isinstance(params, dict):
        raise SqsError("SerializationException", "The request body is not a JSON object.")
    return action, params


async def _dispatch(request: Request, body: bytes, query: bool) -> tuple[str, dict[str, Any]]:
    """(action, the JSON protocol's answer); raises SqsError."""
    principal, access_key_id = await _authenticate(request, body)
    action, params = sqs_query.parse_form(body) if query else _json_call(request, body)
    handler = ACTIONS.get(action)
    if handler is None:
        if action in UNSUPPORTED:
            raise unsupported_operation(action)
        raise SqsError(
            "InvalidAction",
            f"The action {action or '(none)'} is not valid for this endpoint; "
            "Sluice speaks the SQS JSON protocol (X-Amz-Target: AmazonSQS.<Action>) "
            "and the query protocol (Action=<Action>).",
        )
    call = Call(request, ctx_of(request), params, principal, access_key_id)
    return action, await handler(call)


def _error(error: SqsError, query: bool) -> Response:
    if not query:
        return error_response(error)
    request_id = str(uuid.uuid4())
    xml = sqs_query.error_xml(error.legacy, error.message, error.sender_fault, request_id)
    return Response(
        xml,
        status_code=error.status,
        media_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )


async def _handle(request: Request) -> Response:
    body = await request.body()
    query = _is_query_protocol(request)
    try:
        action, answer = await _dispatch(request, body, query)
    except SqsError as error:
        return _error(error, query)
    except SluiceError as error:
        if error.status >= 500:
            return _error(unavailable(), query)
        return _error(invalid_parameter(error.detail), query)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("SQS request failed on the database", extra={"error": type(exc).__name__})
        return _error(unavailable(), query)
    if not query:
        return _answer(answer)
    request_id = str(uuid.uuid4())
    return Response(
        sqs_query.result_xml(action, answer, request_id),
        media_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )


@router.post("/sqs")
async def sqs(request: Request) -> Response:
    return await _handle(request)


@router.post("/sqs/{rest:path}")
async def sqs_queue_url(request: Request) -> Response:
    """Some SDKs post to the queue URL itself; the body names the queue either way."""
    return await _handle(request)
