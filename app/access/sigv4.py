"""AWS Signature Version 4 for the SQS endpoint: issuing SQS credentials and checking
signatures (what botocore's SigV4Auth computes, checked the other way round).

The signing secret of an access key id is never stored: it is HMAC-SHA256 of the id under
the server secret (SLUICE_SQS_SECRET), so a database read alone signs nothing. Rotating
the server secret changes every SQS secret at once (docs/sqs.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
ACCESS_KEY_PREFIX = "SLU"
_ACCESS_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_ACCESS_KEY = re.compile(r"[A-Za-z0-9]{1,128}")
# A signature made longer ago (or further ahead) than this is refused, as AWS does.
MAX_SKEW = timedelta(minutes=15)
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*"
)


def new_access_key_id() -> str:
    """20 characters, as AWS's: a prefix and 17 random base32 characters."""
    return ACCESS_KEY_PREFIX + "".join(secrets.choice(_ACCESS_KEY_ALPHABET) for _ in range(17))


def derive_secret(server_secret: str, access_key_id: str) -> str:
    mac = hmac.new(server_secret.encode(), access_key_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


class Refusal(StrEnum):
    """Why a request's signature is not accepted (the route names the SQS error)."""

    missing = "missing"  # no (SigV4) Authorization header
    malformed = "malformed"
    unknown_key = "unknown_key"
    mismatch = "mismatch"
    expired = "expired"


class SignatureRefused(Exception):
    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.refusal = refusal
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SignedRequest:
    access_key_id: str
    date: str  # yyyymmdd of the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str | None) -> SignedRequest:
    if not header:
        raise SignatureRefused(Refusal.missing, "Request is missing Authentication Token")
    match = _AUTH.fullmatch(header.strip())
    if match is None:
        raise SignatureRefused(
            Refusal.malformed, "Authorization header is not a valid AWS4-HMAC-SHA256 signature"
        )
    parts = match["credential"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not _ACCESS_KEY.fullmatch(parts[0]):
        raise SignatureRefused(Refusal.malformed, "Credential should be scoped correctly")
    return SignedRequest(
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        tuple(match["signed"].split(";")),
        match["signature"],
    )


def _canonical_query(query: str) -> str:
    """Each name and value percent-encoded the AWS way, sorted (a `+` is not a space)."""
    pairs = []
    for pair in query.split("&") if query else ():
        name, _, value = pair.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(pairs))


def check_signature(
    signed: SignedRequest,
    secret: str,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    now: datetime | None = None,
) -> None:
    """Raises SignatureRefused unless `signed` is the signature of this request under
    `secret`. `headers` are (lower-case name, value) pairs as received."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    if "host" not in signed.signed_headers:
        raise SignatureRefused(Refusal.malformed, "The host header must be signed")
    amz_date = (values.get("x-amz-date") or [""])[0]
    try:
        moment = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRefused(Refusal.malformed, "Missing or invalid X-Amz-Date") from None
    now = now or datetime.now(UTC)
    if abs(now - moment) > MAX_SKEW:
        raise SignatureRefused(Refusal.expired, "Signature expired")
    if amz_date[:8] != signed.date:
        raise SignatureRefused(Refusal.malformed, "Credential date does not match X-Amz-Date")
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in values.get(name, []))}\n"
        for name in signed.signed_headers
    )
    # Always the hash of the body received (never a client's x-amz-content-sha256 claim),
    # so that a signature covers what is executed.
    payload = hashlib.sha256(body).hexdigest()
    canonical_request = "\n".join(
        [
            method.upper(),
            quote(path or "/", safe="/~"),
            _canonical_query(query),
            canonical_headers,
            ";".join(signed.signed_headers),
            payload,
        ]
    )
    scope = f"{signed.date}/{signed.region}/{signed.service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (signed.date, signed.region, signed.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signed.signature):
        raise SignatureRefused(
            Refusal.mismatch,
            "The request signature we calculated does not match the signature you provided.",
        )
