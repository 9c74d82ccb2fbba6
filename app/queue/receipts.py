"""Receipts: opaque tokens naming one delivery attempt.

A receipt carries the message's offset, its lease (the claim that handed it out, and the
segment that lease lives in) and the fencing token: MD5 of the lease's random secret and
the offset. The secret never leaves Postgres, so a receipt cannot be forged, and every
ack / nack / extend checks the token against its own offset and lease (storage
`sluice.settle`): a receipt of an older attempt never acts on a newer lease.

Receipts handed out before revision 0004 of the schema carry only the offset and the token;
they still work for the leases that revision carried over (lease 0 below).
"""

from __future__ import annotations

import base64
import re
import struct
import uuid
from collections.abc import Sequence

from sluice.records import Delivery, Receipt

_LAYOUT = struct.Struct(">qqi16s")
_LEGACY_LAYOUT = struct.Struct(">q16s")
# 36 and 24 bytes: multiples of 3, so the base64 text has no padding and a batch of
# receipts decodes as one string.
_LENGTH = 48
_LEGACY_LENGTH = 32
_ALPHABET_ONLY = re.compile(r"[A-Za-z0-9_-]*")


def encode(offset: int, lease_id: int, seg: int, token: uuid.UUID) -> str:
    packed = _LAYOUT.pack(offset, lease_id, seg, token.bytes)
    return base64.urlsafe_b64encode(packed).decode()


def encode_all(deliveries: Sequence[Delivery]) -> list[str]:
    """encode() of each delivery's receipt, in order: one base64 encode of their packed
    concatenation (a pull's receipts; 48 characters each, no padding), then sliced."""
    pack = _LAYOUT.pack
    text = base64.urlsafe_b64encode(
        b"".join([pack(d.offset, d.lease_id, d.seg, d.token.bytes) for d in deliveries])
    ).decode()
    return [text[start : start + _LENGTH] for start in range(0, len(text), _LENGTH)]


def decode(receipt: str) -> Receipt | None:
    """The receipt, or None for anything that is not a receipt we could have issued."""
    if not _ALPHABET_ONLY.fullmatch(receipt):
        return None
    if len(receipt) == _LENGTH:
        offset, lease_id, seg, token = _LAYOUT.unpack(base64.urlsafe_b64decode(receipt))
        return Receipt(offset, lease_id, seg, token.hex())
    if len(receipt) == _LEGACY_LENGTH:
        offset, token = _LEGACY_LAYOUT.unpack(base64.urlsafe_b64decode(receipt))
        return Receipt(offset, 0, 0, token.hex())
    return None


def decode_all(receipts: list[str]) -> list[Receipt | None]:
    """decode() of each receipt, in order. A batch of current receipts (the usual ack of a
    whole pull) is one base64 decode of their concatenation."""
    if (
        receipts
        and all(len(receipt) == _LENGTH for receipt in receipts)
        and _ALPHABET_ONLY.fullmatch(joined := "".join(receipts))
    ):
        raw = base64.urlsafe_b64decode(joined)
        return [
            Receipt(offset, lease_id, seg, token.hex())
            for offset, lease_id, seg, token in _LAYOUT.iter_unpack(raw)
        ]
    return [decode(receipt) for receipt in receipts]
