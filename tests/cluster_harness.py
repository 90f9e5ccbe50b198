"""A real Redis Cluster on loopback: N primaries with one replica each, from redis-server
binaries, built with `redis-cli --cluster create`, stopped by process id."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.harness import missing, redis_binary, wait_until, xdist_worker


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int, start: int = 20_000) -> list[int]:
    """Ports whose bus port (+10000) is free too, both below the kernel's ephemeral range
    (32768 on; tests.harness.free_port's ranges end at 20,000): bus ports from 31,000 on,
    as before, lay inside it, where another worker's connections take ports at any moment
    between the check here and the node's bind."""
    ports: list[int] = []
    # Each xdist worker its own stretch (as tests.harness.free_port), then a time offset.
    port = start + (xdist_worker() % 4) * 680 + (int(time.time() * 1000) % 40) * 16
    while len(ports) < count:
        assert port + 10000 < 32768, "no free cluster ports below the ephemeral range"
        if _free(port) and _free(port + 10000):
            ports.append(port)
        port += 1
    return ports


class RedisCluster:
    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(primaries * (1 + replicas))
        self.dir = Path(tempfile.mkdtemp(prefix="bs-cluster-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._clients: dict[int, redis.Redis] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def client(self, port: int) -> redis.Redis:
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2
            )
        return self._clients[port]

    def start(self) -> RedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            missing("redis-cli (Debian redis-tools) for building a cluster")
        for port in self.ports:
            (self.dir / str(port)).mkdir()
            self._spawn(port)
        for port in self.ports:
            wait_until(lambda p=port: self._answers(p), what=f"cluster node {port}")
        assert cli is not None
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port in self.ports:
            wait_until(lambda p=port: self._ok(p), timeout_s=30, what=f"cluster_state:ok {port}")
        # cluster_state:ok does not wait for replicas to finish their first sync.
        for port in self.ports:
            wait_until(lambda p=port: self._synced(p), timeout_s=30, what=f"replica {port}")
        return self

    def _spawn(self, port: int) -> None:
        node_dir = self.dir / str(port)
        self.processes[port] = subprocess.Popen(
            [
                redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--dir", str(node_dir), "--save", "", "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def restart_empty(self, port: int) -> None:
        """Kill one node and start it again on its nodes.conf: it rejoins with the slots
        it served and no data (no persistence), as a node restarted without its dump."""
        self.kill(port)
        self._spawn(port)
        wait_until(lambda: self._ok(port), timeout_s=30, what=f"cluster_state:ok {port}")

    def _synced(self, port: int) -> bool:
        info = self.client(port).info("replication")
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.RedisError:
            return False

    def _ok(self, port: int) -> bool:
        try:
            info = self.client(port).execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        text = info if isinstance(info, str) else info.decode()
        return "cluster_state:ok" in text

    def primary_of(self, key: str) -> int:
        """The port of the primary serving the slot of `key`, as the cluster says now."""
        for port in self.alive():
            try:
                slot = self.client(port).cluster("KEYSLOT", key)
                for start, end, primary, *_ in self.client(port).execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no live node answered CLUSTER SLOTS")

    def alive(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def kill(self, port: int) -> None:
        if port in self._clients:
            self._clients.pop(port).close()
        proc = self.processes[port]
        proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
