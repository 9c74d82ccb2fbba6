"""SQS errors: the names, HTTP statuses and legacy (query protocol) codes SQS answers with.

The JSON protocol names an error by `__type` (the shape name, e.g. QueueDoesNotExist);
SQS also sends `x-amzn-query-error: <legacy code>;Sender|Receiver`, from which botocore
takes `Error.Code` (e.g. AWS.SimpleQueueService.NonExistentQueue) while it still raises
the modelled exception class (client.exceptions.QueueDoesNotExist). The route serialises
SqsError; nothing here knows HTTP beyond the status number.
"""

from __future__ import annotations


class SqsError(Exception):
    def __init__(
        self,
        name: str,
        message: str,
        *,
        status: int = 400,
        legacy: str | None = None,
        sender_fault: bool = True,
    ) -> None:
        super().__init__(message)
        self.name = name  # the JSON protocol's error shape (`__type`)
        self.message = message
        self.status = status
        self.legacy = legacy or name  # the query protocol's code
        self.sender_fault = sender_fault


def queue_does_not_exist() -> SqsError:
    return SqsError(
        "QueueDoesNotExist",
        "The specified queue does not exist.",
        legacy="AWS.SimpleQueueService.NonExistentQueue",
    )


def queue_name_exists(detail: str = "The specified queue already exists.") -> SqsError:
    return SqsError("QueueNameExists", detail, legacy="QueueAlreadyExists")


def receipt_handle_invalid(handle: str) -> SqsError:
    return SqsError(
        "ReceiptHandleIsInvalid",
        f'The input receipt handle "{handle[:100]}" is not a valid receipt handle.',
    )


def message_not_inflight() -> SqsError:
    return SqsError(
        "MessageNotInflight",
        "The message referred to is not in flight.",
        legacy="AWS.SimpleQueueService.MessageNotInflight",
    )


def invalid_parameter(message: str) -> SqsError:
    return SqsError("InvalidParameterValue", message)


def invalid_value(name: str, value: object, reason: str) -> SqsError:
    return invalid_parameter(f"Value {value} for parameter {name} is invalid. Reason: {reason}")


def missing_parameter(name: str) -> SqsError:
    return SqsError("MissingParameter", f"The request must contain the parameter {name}.")


def invalid_attribute_name(name: str) -> SqsError:
    return SqsError("InvalidAttributeName", f"Unknown Attribute {name}.")


def invalid_attribute_value(name: str, reason: str) -> SqsError:
    return SqsError(
        "InvalidAttributeValue", f"Invalid value for the parameter {name}. Reason: {reason}"
    )


def batch_error(name: str, message: str) -> SqsError:
    return SqsError(name, message, legacy=f"AWS.SimpleQueueService.{name}")


def empty_batch() -> SqsError:
    return batch_error("EmptyBatchRequest", "There should be at least one entry in the request.")


def too_many_entries(count: int) -> SqsError:
    return batch_error(
        "TooManyEntriesInBatchRequest",
        f"Maximum number of entries per request are 10. You have sent {count}.",
    )


def ids_not_distinct() -> SqsError:
    return batch_error("BatchEntryIdsNotDistinct", "Two or more batch entries have the same Id.")


def invalid_batch_id() -> SqsError:
    return batch_error(
        "InvalidBatchEntryId",
        "A batch entry id can only contain alphanumeric characters, hyphens and underscores. "
        "It can be at most 80 letters long.",
    )


def batch_too_long(limit: int) -> SqsError:
    return batch_error(
        "BatchRequestTooLong", f"Batch requests cannot be longer than {limit} bytes."
    )


def unsupported_operation(action: str) -> SqsError:
    return SqsError(
        "UnsupportedOperation",
        f"The action {action} is not valid for this endpoint.",
        legacy="AWS.SimpleQueueService.UnsupportedOperation",
    )


def unavailable() -> SqsError:
    return SqsError(
        "ServiceUnavailable",
        "The database is unavailable; retry shortly.",
        status=503,
        sender_fault=False,
    )
