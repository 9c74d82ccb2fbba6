"""The scope grammar: what a key is granted, what an operation needs, and whether one
satisfies the other.

Granted scopes: `admin` (everything), `publish:<glob>`, `consume:<glob>`, `read:<glob>`,
with shell-style, case-sensitive globs over topic names (`orders-*`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase


class Kind(StrEnum):
    admin = "admin"
    publish = "publish"
    consume = "consume"
    read = "read"


# The kinds that take a topic glob (every kind but admin).
TOPIC_KINDS = (Kind.publish, Kind.consume, Kind.read)
# Globs are topic names plus the shell wildcards * ? [ ] and ! (negated classes).
_GLOB = re.compile(r"[A-Za-z0-9_\-*?\[\]!]{1,200}")


@dataclass(frozen=True)
class KeyScope:
    """One granted scope: `admin`, or a kind with a topic glob."""

    kind: Kind
    glob: str | None = None

    def __str__(self) -> str:
        return self.kind if self.glob is None else f"{self.kind}:{self.glob}"


def parse_scope(text: str) -> KeyScope:
    """`admin`, `publish:<glob>`, `consume:<glob>` or `read:<glob>`; ValueError otherwise."""
    if text == Kind.admin:
        return KeyScope(Kind.admin)
    kind, sep, glob = text.partition(":")
    if not sep or kind not in TOPIC_KINDS:
        raise ValueError(
            f"invalid scope {text!r}: use admin, publish:<glob>, consume:<glob> or read:<glob>"
        )
    if not _GLOB.fullmatch(glob):
        raise ValueError(
            f"invalid topic glob {glob!r} in scope {text!r}: "
            "use topic-name characters [A-Za-z0-9_-] and the wildcards * ? [ ] !"
        )
    return KeyScope(Kind(kind), glob)


class Reach(StrEnum):
    """Which topics a requirement is about."""

    topic = "topic"  # the one topic of the request (its path names it)
    any = "any"  # some topic: listing topics, which then shows only those the globs match
    all = "all"  # every topic (glob `*`): e.g. /metrics, which names every topic


@dataclass(frozen=True)
class Requirement:
    """The scope an operation needs; `admin` satisfies every requirement.

    With reach `topic`, `topic` is the topic of one request (None: the rule, as documented).
    """

    kind: Kind
    reach: Reach = Reach.topic
    topic: str | None = None

    @property
    def per_topic(self) -> bool:
        """Whether it is decided by the topic of each request."""
        return self.reach == Reach.topic and self.kind != Kind.admin

    def __str__(self) -> str:
        if self.kind == Kind.admin:
            return "admin"
        target = {Reach.topic: self.topic, Reach.any: "<any glob>", Reach.all: "*"}[self.reach]
        return f"{self.kind}:{target}"


ADMIN = Requirement(Kind.admin)


def satisfies(scopes: Iterable[KeyScope], need: Requirement) -> bool:
    for scope in scopes:
        if scope.kind == Kind.admin:
            return True
        if scope.kind != need.kind or need.kind == Kind.admin:
            continue
        assert scope.glob is not None
        if need.reach == Reach.any:
            return True
        if need.reach == Reach.all and scope.glob == "*":
            return True
        if (
            need.reach == Reach.topic
            and need.topic is not None
            and fnmatchcase(need.topic, scope.glob)
        ):
            return True
    return False
