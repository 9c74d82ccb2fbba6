"""Receipts: opaque tokens naming one delivery attempt.

A receipt is the message offset plus the lease's random 128-bit fencing token
(gen_random_uuid() or uuid4, both from a cryptographic source). The token is checked in
the WHERE clause of every ack/nack/extend, so a receipt cannot be guessed and an old
attempt's receipt can never act on a newer lease.
"""

from __future__ import annotations

import base64
import binascii
import struct
import uuid

_LAYOUT = struct.Struct(">q16s")


def encode(offset: int, token: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(_LAYOUT.pack(offset, token.bytes)).decode().rstrip("=")


def decode(receipt: str) -> tuple[int, uuid.UUID] | None:
    """(offset, token), or None for anything that is not a receipt we could have issued."""
    if len(receipt) != 32:
        return None
    try:
        raw = base64.urlsafe_b64decode(receipt + "====")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _LAYOUT.size:
        return None
    offset, token = _LAYOUT.unpack(raw)
    return offset, uuid.UUID(bytes=token)


def split(
    receipts: list[str],
) -> tuple[list[int], list[uuid.UUID], dict[int, list[str]], list[str]]:
    """Decode a batch: (offsets, tokens, receipts by offset, undecodable receipts)."""
    offsets: list[int] = []
    tokens: list[uuid.UUID] = []
    by_offset: dict[int, list[str]] = {}
    invalid: list[str] = []
    for receipt in receipts:
        decoded = decode(receipt)
        if decoded is None:
            invalid.append(receipt)
            continue
        offsets.append(decoded[0])
        tokens.append(decoded[1])
        by_offset.setdefault(decoded[0], []).append(receipt)
    return offsets, tokens, by_offset, invalid
