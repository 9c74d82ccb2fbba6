"""The layering of the design, checked over every import (functions' own included):

    api (HTTP)  ->  queue (semantics)  ->  storage (the only SQL)
             \\-> access (API keys)  ->  storage.keys

records and errors are shared by all; nothing below a layer reaches up into it, and a
router never touches storage (it sees typed records, never a database row)."""

from __future__ import annotations

from tests.test_imports import PACKAGE_DIRS, import_graph

# layer prefix -> the sluice modules (prefixes) it must never import
FORBIDDEN = {
    "sluice.records": ("sluice.",),
    "sluice.errors": ("sluice.",),
    "sluice.storage": (
        "sluice.queue",
        "sluice.api",
        "sluice.access",
        "sluice.metrics",
        "sluice.main",
        "sluice.cli",
        "sluice.startup",
        "sluice.errors",
    ),
    "sluice.queue": ("sluice.api", "sluice.access", "sluice.metrics", "sluice.main", "sluice.cli"),
    "sluice.api": ("sluice.storage",),
    "sluice.access": ("sluice.api", "sluice.queue"),
    "sluice.metrics": ("sluice.storage", "sluice.queue", "sluice.api"),
}


def _in(module: str, prefix: str) -> bool:
    return (
        module == prefix
        or module.startswith(prefix + ".")
        or (prefix.endswith(".") and module.startswith(prefix))
    )


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        for layer, forbidden in FORBIDDEN.items():
            if not _in(module, layer):
                continue
            for target in sorted(imported):
                if any(_in(target, f) for f in forbidden) and not _in(target, layer):
                    found.append(f"{module} -> {target}")
    return found


def test_each_layer_imports_only_what_is_below_it() -> None:
    graph = import_graph(PACKAGE_DIRS)
    assert "sluice.storage.claims" in graph and "sluice.api.routes.topics" in graph
    assert not violations(graph), "\n".join(violations(graph))


def test_the_layer_check_sees_a_router_reaching_into_storage() -> None:
    graph = {
        "sluice.api.routes.topics": {"sluice.storage.log", "sluice.queue.topics"},
        "sluice.queue.topics": {"sluice.storage.log", "sluice.records"},
        "sluice.storage.log": {"sluice.records", "sluice.queue.context"},
        "sluice.records": set(),
    }
    assert violations(graph) == [
        "sluice.api.routes.topics -> sluice.storage.log",
        "sluice.storage.log -> sluice.queue.context",
    ]
