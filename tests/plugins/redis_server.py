"""A private redis-server for the test session (never the machine's own server on 6379).

`redis_server` (session): started on a free localhost port in a temp dir with append-only
persistence and no RDB snapshots; `.url`, `.port`, `.client()`, `.restart()`.
`redis_client` (function): a client on it, after FLUSHALL.
`private_redis` (function): a factory of servers of the test's own, to kill and restart:
`private_redis(persistence="aof" | "rdb" | "none", started=True)`; each is stopped at the end.
`free_port()`: a port nothing listens on (for an index that is unreachable).
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# persistence -> redis-server options: append-only file (fsynced every second, Redis's default) or
# an RDB snapshot each second with a write (SIGKILL may lose that second too), or none (a restart is empty)
PERSISTENCE = {
    "aof": ["--save", "", "--appendonly", "yes"],
    "rdb": ["--save", "1 1", "--appendonly", "no"],
    "none": ["--save", "", "--appendonly", "no"],
}


class RedisServer:
    def __init__(self, binary: str, workdir: Path, persistence: str = "aof"):
        self.binary, self.dir, self.persistence = binary, workdir, persistence
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", *PERSISTENCE[self.persistence],
             "--dir", str(self.dir), "--logfile", str(log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with self.client(socket_connect_timeout=0.2, socket_timeout=0.5) as c:
                    if c.ping():
                        return
            except redis.exceptions.RedisError:  # not listening, or still loading the AOF
                time.sleep(0.02)
        self.stop()
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        raise RuntimeError(f"redis-server on port {port} did not answer PING:\n{tail}")

    def stop(self) -> None:
        """SIGTERM: redis fsyncs the append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save (an RDB snapshot loses what came after it; an AOF
        was written before each reply, so only a machine crash loses its unsynced second)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start(self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (apt-get install redis-server); "
                    "Redis-backed tests need a real private server")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    for attempt in range(3):  # a free port can be taken between probe and bind
        try:
            server.start(free_port())
            break
        except RuntimeError:
            if attempt == 2:
                raise
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (apt-get install redis-server)")
    servers = []

    def make(persistence: str = "aof", started: bool = True, port: int | None = None) -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis{len(servers)}", persistence)
        server.dir.mkdir()
        server.port = port or free_port()
        servers.append(server)
        if started:
            server.start(server.port)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()
