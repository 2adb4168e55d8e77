"""Real Redis servers for the tests: a standalone server and a 3-primary Cluster.

A pytest plugin (registered by ``conftest.py``). Session-scoped fixtures start
``redis-server`` processes on free loopback ports, in temporary directories, and stop
them at the end; ``disposable_redis`` is a function-scoped server a test may kill and
restart. ``build_redis_store`` builds the Redis flavours of the conformance ``store``.

Everything binds to 127.0.0.1; nothing is persisted unless a test asks for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "RedisCluster",
    "RedisFactory",
    "RedisSentinel",
    "RedisServer",
    "RedisTLSServer",
    "TLSFiles",
    "build_redis_store",
    "free_port",
    "require_redis_server",
]

# A fresh redis-server answers PING within a few milliseconds; 10 s covers a loaded CI box.
START_DEADLINE = 10.0
# Cluster creation gossips between nodes; on two cores this takes a second or two.
CLUSTER_DEADLINE = 30.0
# Ports are picked by binding to 0, then handed to redis-server: another process can grab
# one in between, so a failed start is retried on new ports this many times.
START_ATTEMPTS = 3


def require_redis_server() -> str:
    """Path of ``redis-server``, or skip the test where the binary does not exist."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server binary not found on PATH")
    return path


def free_port(*, avoid: Sequence[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid and port != 6379:
            return port


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port nothing listens on while the block runs: bound here, never
    listened on (a connection is refused), so that no other process, another test
    worker's server, takes it meanwhile (a port of `free_port` is free only that instant)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            # -NOAUTH: up, and wanting a password (``--requirepass``)
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli binary not found on PATH")
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


class RedisServer:
    """One ``redis-server`` process on a loopback port, in its own directory.

    ``kill()`` sends SIGKILL (a crash), ``stop()`` a clean shutdown, ``start()`` brings
    it back on the same port and directory, so an append-only file survives a restart.
    """

    def __init__(
        self, directory: Path, *, port: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra,
        ]

    def start(self) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING."""
        if self.running:
            return self
        for _ in range(START_ATTEMPTS):
            self.proc = subprocess.Popen(
                self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + START_DEADLINE
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._alive():
                    if not self._anothers():
                        return self
                    break  # another process's server took the port first
                time.sleep(0.02)
            self._reap()
            if not self._port_taken() and not self._bus_port_taken():
                break
            # lost a port to another process (another test worker's server): new ones
            self.port = free_port()
            if "--cluster-port" in self.extra:
                at = self.extra.index("--cluster-port") + 1
                self.extra[at] = str(free_port(avoid=[self.port]))
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")

    def _alive(self) -> bool:
        return _ping(self.port)

    def _anothers(self) -> bool:
        """Whether the server answering on the port is another process's: one that took
        the port between `free_port` and this start (this one then exits, unable to bind
        it). A server that does not say (a password asked, TLS) is taken for this one."""
        assert self.proc is not None
        pid = re.search(r"process_id:(\d+)", _cli(self.port, "INFO", "server"))
        return pid is not None and int(pid[1]) != self.proc.pid

    def _port_taken(self, port: int | None = None) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", self.port if port is None else port))
            except OSError:
                return True
        return False

    def _bus_port_taken(self) -> bool:
        """A cluster node's bus port (``--cluster-port``), chosen with the client port."""
        if "--cluster-port" not in self.extra:
            return False
        return self._port_taken(int(self.extra[self.extra.index("--cluster-port") + 1]))

    def _reap(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs (a stall, a long GC of its host) with its sockets
        open; the kernel still accepts connections and buffers what clients send."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused server runs again and reads what piled up meanwhile."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as in a crash."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM), killing after a grace period."""
        if self.proc is None:
            return
        self.resume()  # a paused server would not act on SIGTERM until continued
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._reap()
        self.proc = None

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)


@dataclass(frozen=True)
class TLSFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and
    a second CA that signed nothing of this server (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Generate the certificates of a `TLSFiles` with the ``cryptography`` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        usage: x509.ObjectIdentifier | None = None,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name, signer = issuer if issuer is not None else (name, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        # The key identifiers and the CA's key usage that RFC 5280 asks for: Python 3.13's
        # ssl.create_default_context() (and redis-py's context, made by it) sets
        # VERIFY_X509_STRICT, which rejects a chain without them.
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
        if issuer is None:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                False,
            )
        return builder.sign(signer, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = cert("livekit-resume test CA", ca_key, None)
    other = cert("some other CA", other_key, None)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    signed_by_ca = (ca.subject, ca_key)
    server = cert("127.0.0.1", server_key, signed_by_ca, ExtendedKeyUsageOID.SERVER_AUTH)
    client = cert("worker", client_key, signed_by_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return TLSFiles(
        ca=write("ca.pem", ca.public_bytes(pem)),
        server_cert=write("server.pem", server.public_bytes(pem)),
        server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.pem", client.public_bytes(pem)),
        client_key=write("client.key", key_pem(client_key)),
        other_ca=write("other-ca.pem", other.public_bytes(pem)),
    )


class RedisTLSServer(RedisServer):
    """A ``redis-server`` that speaks only TLS (``--port 0 --tls-port …``), with the
    certificates of ``files``. ``auth_clients``: ``no``, ``optional`` or ``yes`` (a
    client certificate signed by the CA required)."""

    def __init__(self, directory: Path, files: TLSFiles, *, auth_clients: str = "no") -> None:
        super().__init__(directory)
        self.files = files
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = super()._argv()
        argv[argv.index("--port") + 1] = "0"
        return [
            *argv,
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.files.server_cert),
            "--tls-key-file",
            str(self.files.server_key),
            "--tls-ca-cert-file",
            str(self.files.ca),
            "--tls-auth-clients",
            self.auth_clients,
        ]

    def _alive(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.files.ca))
        context.load_cert_chain(str(self.files.client_cert), str(self.files.client_key))
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


def require_tls_redis() -> str:
    """Path of ``redis-server``, or skip where it was built without TLS: a build with
    TLS tries to load the (missing) certificate it is given; one without refuses the
    directive."""
    binary = require_redis_server()
    missing = "/nonexistent/livekit-resume-probe.pem"
    done = subprocess.run(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            "1",
            "--tls-cert-file",
            missing,
            "--tls-key-file",
            missing,
            "--tls-ca-cert-file",
            missing,
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    said = done.stdout + done.stderr
    if "Failed to load certificate" not in said:
        pytest.skip(f"redis-server was built without TLS: {said.strip()[-200:]}")
    return binary


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and the certificates of a TLS server on 127.0.0.1, made for this run."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@contextlib.contextmanager
def _tls_server(files: TLSFiles, directory: Path, auth_clients: str) -> Iterator[RedisTLSServer]:
    require_tls_redis()
    server = RedisTLSServer(directory, files, auth_clients=auth_clients)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_redis(tls_files: TLSFiles, tmp_path: Path) -> Iterator[RedisTLSServer]:
    """A ``redis-server`` speaking only TLS, client certificates optional."""
    with _tls_server(tls_files, tmp_path / "redis-tls", "optional") as server:
        yield server


@pytest.fixture
def mtls_redis(tls_files: TLSFiles, tmp_path: Path) -> Iterator[RedisTLSServer]:
    """A TLS ``redis-server`` that requires a client certificate signed by its CA."""
    with _tls_server(tls_files, tmp_path / "redis-mtls", "yes") as server:
        yield server


class RedisSentinel(RedisServer):
    """A ``redis-server --sentinel`` watching one primary under a service name."""

    def __init__(
        self,
        directory: Path,
        primary: RedisServer,
        service: str = "mymaster",
        *,
        down_after_ms: int = 5000,
    ) -> None:
        super().__init__(directory)
        self.service = service
        self.config = directory / "sentinel.conf"
        self.config.write_text(
            f"bind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            str(self.config),
            "--sentinel",
            "--port",
            str(self.port),
            "--logfile",
            str(self.directory / "sentinel.log"),
        ]


class RedisCluster:
    """Three primaries with ``--cluster-enabled yes``, joined by ``redis-cli --cluster``.
    ``full_coverage=False``: it keeps serving the slots of the others while a primary is
    stopped (``cluster-require-full-coverage no``)."""

    def __init__(self, directory: Path, *, primaries: int = 3, full_coverage: bool = True) -> None:
        self.nodes: list[RedisServer] = []
        used: list[int] = []
        for i in range(primaries):
            port = free_port(avoid=used)
            bus = free_port(avoid=[*used, port])
            used += [port, bus]
            node_dir = directory / f"node{i}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    port=port,
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-port",
                        str(bus),
                        "--cluster-node-timeout",
                        "5000",
                        *([] if full_coverage else ["--cluster-require-full-coverage", "no"]),
                    ],
                )
            )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        out = _cli(
            self.nodes[0].port,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout=CLUSTER_DEADLINE,
        )
        deadline = time.monotonic() + CLUSTER_DEADLINE
        while time.monotonic() < deadline:
            infos = [n.cli("cluster", "info") for n in self.nodes]
            if all("cluster_state:ok" in i and "cluster_known_nodes:3" in i for i in infos):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis cluster did not reach cluster_state:ok:\n{out}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone ``redis-server`` for the whole test session (never port 6379)."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-primary Redis Cluster for the whole test session."""
    require_redis_server()
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def disposable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, to kill and restart. It keeps an append-only file
    fsynced on every write, so what it acknowledged survives a SIGKILL and a restart."""
    require_redis_server()
    server = RedisServer(
        tmp_path / "redis", extra=["--appendonly", "yes", "--appendfsync", "always"]
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_sentinel(disposable_redis: RedisServer, tmp_path: Path) -> Iterator[RedisSentinel]:
    """A Sentinel watching ``disposable_redis`` as service ``mymaster``."""
    sentinel = RedisSentinel(tmp_path / "sentinel", disposable_redis)
    sentinel.start()
    try:
        yield sentinel
    finally:
        sentinel.stop()


class RedisFactory:
    """Starts servers of one test with extra arguments (``--maxmemory 2mb``,
    ``--replicaof …``) and stops them all when the test ends. Without extra arguments a
    server persists nothing (``--save "" --appendonly no``): a restart loses its data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RedisServer] = []

    def __call__(self, *extra: str) -> RedisServer:
        server = RedisServer(self.directory / f"redis{len(self.servers)}", extra=extra)
        self.servers.append(server)
        return server.start()

    def replica_of(self, primary: RedisServer, *extra: str) -> RedisServer:
        """A replica of ``primary``, returned once its link is up and in sync."""
        replica = self("--replicaof", "127.0.0.1", str(primary.port), *extra)
        deadline = time.monotonic() + START_DEADLINE
        while "master_link_status:up" not in replica.cli("info", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {replica.port} did not sync")
            time.sleep(0.05)
        return replica

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[RedisFactory]:
    """Servers of this test alone, started with the arguments it asks for."""
    require_redis_server()
    factory = RedisFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop()


def _fake_client() -> Any:
    if importlib.util.find_spec("lupa") is None:  # fakeredis runs Lua through lupa
        pytest.skip("fakeredis needs the lupa package to run Lua scripts: pip install lupa")
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def build_redis_store(kind: str, request: pytest.FixtureRequest, **opts: Any) -> Any:
    """A `RedisStore` of the given flavour: ``fakeredis``, ``redis`` or ``redis_cluster``."""
    from livekit_resume.stores.redis import RedisStore

    if kind == "fakeredis":
        return RedisStore(_fake_client(), **opts)
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return RedisStore.from_url(server.url, **opts)
    if kind == "redis_cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return RedisStore.from_url(cluster.url, **opts)
    raise ValueError(f"unknown redis store kind {kind!r}")
