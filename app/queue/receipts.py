"""Receipts: opaque tokens naming one delivery attempt.

A receipt is the message offset plus the lease's 128-bit fencing token: gen_random_uuid()
(a cryptographic source), or for fresh claims MD5 of a per-claim gen_random_uuid() secret
and the offset (see storage.delivery._CLAIM_FRESH). The token is checked in
the WHERE clause of every ack/nack/extend, so a receipt cannot be guessed and an old
attempt's receipt can never act on a newer lease.
"""

from __future__ import annotations

import base64
import re
import struct
import uuid

_LAYOUT = struct.Struct(">q16s")


def encode(offset: int, token: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(_LAYOUT.pack(offset, token.bytes)).decode().rstrip("=")


# A receipt is exactly 32 characters of the URL-safe base64 alphabet (24 bytes, no padding).
_RECEIPT_LENGTH = 32
_ALPHABET_ONLY = re.compile(r"[A-Za-z0-9_-]*")

# (offset, token as 32 hex digits): what the database compares a receipt with.
Key = tuple[int, str]


def decode(receipt: str) -> Key | None:
    """(offset, token hex), or None for anything that is not a receipt we could have issued."""
    if len(receipt) != _RECEIPT_LENGTH or not _ALPHABET_ONLY.fullmatch(receipt):
        return None
    offset, token = _LAYOUT.unpack(base64.urlsafe_b64decode(receipt))
    return offset, token.hex()


def decode_all(receipts: list[str]) -> list[Key | None]:
    """decode() of each receipt, in order. A batch of well-formed receipts (the usual ack of
    a whole pull) is one base64 decode of their concatenation: 32 characters are 24 bytes
    exactly, so receipts never share a byte."""
    if (
        receipts
        and all(len(receipt) == _RECEIPT_LENGTH for receipt in receipts)
        and _ALPHABET_ONLY.fullmatch(joined := "".join(receipts))
    ):
        raw = base64.urlsafe_b64decode(joined)
        return [(offset, token.hex()) for offset, token in _LAYOUT.iter_unpack(raw)]
    return [decode(receipt) for receipt in receipts]
