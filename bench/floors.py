"""What bench/publish_floor.py and bench/consume_floor.py share: one embedded Postgres with a
floor app (bench/wrk/floor_*_app.py, a uvicorn process on a database of its own), a Sluice
server and pgmq (where its install file is), each behind the bench's Peer interface, so the
bench's own load generator drives all three the same way; everything is stopped after."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from bench.infra import Postgres, SluiceServer, free_port
from bench.peers import Peer
from bench.peers.pgmq import PgmqPeer
from bench.peers.sluice import SluicePeer
from bench.run import DEFAULT_PGMQ_SQL
from bench.wrk.run import start_floor, wait_answering


@contextlib.asynccontextmanager
async def floor_sluice_pgmq(
    floor_app: str, floor_name: str
) -> AsyncIterator[tuple[Postgres, dict[str, Peer]]]:
    """The Postgres and the started peers by name: `floor_name` (the uvicorn app
    `floor_app`, spoken to as Sluice is), "sluice", and "pgmq" when it can be installed."""
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    await postgres.configure()
    floor_url = await postgres.create_database("bench_floor")
    sluice_url = await postgres.create_database("bench_sluice")
    tmp = Path(tempfile.mkdtemp(prefix="sluice-floor-"))
    server = SluiceServer(sluice_url, 1, tmp, env={"SLUICE_LOG_LEVEL": "WARNING"})
    port = free_port()
    floor = start_floor(floor_app, port, {"FLOOR_DATABASE_URL": floor_url})
    peers: dict[str, Peer] = {}
    try:
        await wait_answering(f"http://127.0.0.1:{port}")
        await server.start()
        peers[floor_name] = SluicePeer(f"http://127.0.0.1:{port}", floor_url)
        peers[floor_name].server_pid = floor.pid
        peers["sluice"] = SluicePeer(server.base_url, server.database_url)
        peers["sluice"].server_pid = server.pid
        if DEFAULT_PGMQ_SQL.is_file():
            peers["pgmq"] = PgmqPeer(await postgres.create_database("bench_pgmq"), DEFAULT_PGMQ_SQL)
        for peer in peers.values():
            await peer.start()
        yield postgres, peers
    finally:
        for peer in peers.values():
            await peer.close()
        await server.stop()
        floor.terminate()
        floor.wait(10)
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
