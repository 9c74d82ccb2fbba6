"""Static checks of Dockerfile, docker-compose.yml and .dockerignore (no Docker engine here:
what can be checked without building is checked here)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


# ---- Dockerfile parsing ------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV key=value: {args}"
                values[key] = value
    return values


def official(image: str, name: str) -> bool:
    """An official Docker Hub image: `name:tag` or `library/name` / `docker.io/library/name`."""
    repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image else image
    return repo in (name, f"library/{name}", f"docker.io/library/{name}")


# ---- .dockerignore -----------------------------------------------------------------------


def ignored(path: str) -> bool:
    """Last matching rule wins; a rule matching a directory covers what lies beneath."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            result = not negate
    return result


# ---- docker-compose ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def test_compose_has_postgres_and_sluice(compose):
    assert {"postgres", "sluice"} <= set(compose["services"])


def test_postgres_service_is_official_17_with_healthcheck_and_volume(compose):
    pg = compose["services"]["postgres"]
    assert official(pg["image"], "postgres") and pg["image"].split(":")[1].startswith("17")
    assert "pg_isready" in healthcheck_command(pg)
    env = environment(pg)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(env)
    mounts = [str(v) for v in pg["volumes"]]
    data_mount = next(m for m in mounts if m.split(":")[1] == "/var/lib/postgresql/data")
    assert data_mount.split(":")[0] in (compose.get("volumes") or {}), "named volume declared"


def test_sluice_service_builds_here_and_waits_for_healthy_postgres(compose):
    sluice = compose["services"]["sluice"]
    build = sluice["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert Path(ROOT, context).resolve() == ROOT
    assert sluice["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "8000:8000" in [str(p) for p in sluice["ports"]]
    check = healthcheck_command(sluice)
    assert "/readyz" in check and ":8000" in check


def test_database_url_points_at_the_postgres_service(compose):
    url = environment(compose["services"]["sluice"])["DATABASE_URL"]
    match = re.fullmatch(r"postgresql://([^:@/]+):([^@/]+)@postgres:5432/([A-Za-z0-9_]+)", url)
    assert match, url
    pg = environment(compose["services"]["postgres"])
    assert match.groups() == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


def test_sluice_healthcheck_is_valid_python(compose):
    test = compose["services"]["sluice"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    compile(test[3], "healthcheck", "exec")


# ---- Dockerfile --------------------------------------------------------------------------


def test_every_base_image_is_the_official_python_311_slim():
    images = [args.split()[0] for k, args in dockerfile_instructions() if k == "FROM"]
    images = [i for i in images if not i.startswith("--")]
    assert images
    for image in images:
        assert official(image, "python") and image.split(":")[1].startswith("3.11-slim"), image


def test_runs_as_a_non_root_user():
    users = [args for k, args in final_stage() if k == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), users[-1]


def test_healthcheck_hits_readyz_with_python():
    checks = [args for k, args in final_stage() if k == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert "--interval" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and "/readyz" in argv[2] and ":8000" in argv[2]
    compile(argv[2], "healthcheck", "exec")


def test_cmd_is_sluice_serve_on_all_interfaces_port_8000():
    cmds = [args for k, args in final_stage() if k == "CMD"]
    argv = exec_form(cmds[-1])
    assert argv[:2] == ["sluice", "serve"], argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8000"
    assert "8000" in [args for k, args in final_stage() if k == "EXPOSE"]


def test_migrations_ship_in_the_wheel_the_image_installs():
    """The wheel carries the migrations (package sluice.migrations): the build stage copies
    them next to the code before `pip wheel`, and the final stage needs no copy of its own
    nor a SLUICE_MIGRATIONS_DIR (test_packaging.py starts an installed wheel)."""
    instructions = dockerfile_instructions()
    first_from, last_from = (i for i, (k, _) in enumerate(instructions) if k == "FROM")
    build = instructions[first_from:last_from]
    copied = [shlex.split(args)[0].rstrip("/") for k, args in build if k == "COPY"]
    assert "app" in copied and "migrations" in copied, copied
    wheel_step = next(i for i, (k, args) in enumerate(build) if k == "RUN" and "wheel" in args)
    copy_steps = [i for i, (k, args) in enumerate(build) if k == "COPY"]
    assert max(copy_steps) < wheel_step
    assert "SLUICE_MIGRATIONS_DIR" not in env_values(final_stage())


def test_console_script_exists_for_the_cmd():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^sluice\s*=\s*"sluice\.cli:main"', text, re.M)


def test_build_context_holds_what_the_dockerfile_copies():
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", ".git/HEAD", ".sluice/pgdata/PG_VERSION", "tests/conftest.py"):
        assert ignored(path), path
    assert ignored("app/__pycache__/main.cpython-311.pyc")
    for path in ("app/main.py", "migrations/env.py", "pyproject.toml", "README.md"):
        assert not ignored(path), path
