"""A real S3-compatible server for the object-store tests, and the network between it and its
clients, whose faults a test controls.

`S3Server` runs moto's S3 server mode (its own venv, built by build.sh) on 127.0.0.1, behind a
`FaultyNetwork`: a TCP relay that the clients connect to. The relay delivers faults as a
network does: `cut_next_response(after, down_for)` resets the connection once `after` bytes of
one response have passed (the client sees a half-read body and a reset) and then refuses every
connection, open ones reset, for `down_for` seconds; `down()` / `up()` take the server off the
network and back for as long as the test likes. The server's data survives (the relay goes
down, not moto, whose store is in memory).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from control_plane import binaries, free_port

# SO_LINGER on with a 0 s timeout: close() sends a RST, as a crashed peer or a dropped
# route does, instead of an orderly FIN
_RESET = struct.pack("ii", 1, 0)
ACCESS_KEY, SECRET_KEY, REGION = "b3-test", "b3-test-secret", "us-east-1"


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        sock.close()
    except OSError:
        pass


class FaultyNetwork:
    """A TCP relay from 127.0.0.1:`port` to `upstream`, up unless a fault holds it down."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.cuts = 0  # responses cut so far
        self._cut_after: int | None = None
        self._cut_down_for = 0.0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # --- faults ------------------------------------------------------------------------------

    def cut_next_response(self, after: int, down_for: float) -> None:
        """Reset the next response that grows past `after` bytes, then be down `down_for` s."""
        with self._lock:
            self._cut_after, self._cut_down_for = after, down_for

    def down(self, seconds: float = float("inf")) -> None:
        with self._lock:
            self._down_until = time.time() + seconds
        self._drop_all()

    def up(self) -> None:
        with self._lock:
            self._down_until = 0.0

    def stop(self) -> None:
        self._stopped = True
        self._drop_all()
        self._thread.join(timeout=5)

    # --- the relay ---------------------------------------------------------------------------

    def _is_down(self) -> bool:
        with self._lock:
            return time.time() < self._down_until

    def _drop_all(self) -> None:
        with self._lock:
            doomed, self._open = list(self._open), set()
        for sock in doomed:
            _reset(sock)

    def _accept_loop(self) -> None:
        while not self._stopped:
            if self._is_down():  # refused: nothing listens on the port
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                    self._drop_all()
                time.sleep(0.05)
                continue
            if self._listener is None:
                self._listener = socket.socket()
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listener.bind(("127.0.0.1", self.port))
                self._listener.listen(64)
                self._listener.settimeout(0.1)
            try:
                client, _ = self._listener.accept()
            except OSError:  # the 0.1 s timeout: look at the faults again
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()
        if self._listener is not None:
            self._listener.close()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        with self._lock:
            self._open.update((client, server))
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        self._pump(server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                with self._lock:
                    cut = response and self._cut_after is not None and passed + len(data) > self._cut_after
                    if cut:
                        keep, self._cut_after = self._cut_after - passed, None
                        self._down_until = time.time() + self._cut_down_for
                        self.cuts += 1
                if cut:
                    sink.sendall(data[:keep])
                    self._drop_all()
                    return
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class S3Server:
    """moto's S3 server on a free port, reached through a FaultyNetwork (`network`)."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log = open(log_dir / "s3-server.log", "w")  # noqa: SIM115 (open while it runs)
        self.process = subprocess.Popen([str(binaries()["s3-server"]), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"the S3 server did not start; see {self.log.name}") from None
                time.sleep(0.1)
        self.network = FaultyNetwork(("127.0.0.1", self.port))

    @property
    def endpoint(self) -> str:
        """host:port that clients use (through the faulty network)."""
        return f"127.0.0.1:{self.network.port}"

    def uri(self, bucket_and_key: str) -> str:
        """An s3:// URI that pyarrow resolves to this server (credentials from the env)."""
        return f"s3://{bucket_and_key}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        """A pyarrow S3FileSystem on the server directly (not through the faulty network)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION, scheme="http",
                                 endpoint_override=f"127.0.0.1:{self.port}", allow_bucket_creation=True)  # fmt: skip

    def put(self, key: str, data: bytes) -> None:
        """Upload `data` to bucket/key (the bucket made if needed)."""
        fs = self.filesystem()
        fs.create_dir(key.split("/", 1)[0])
        with fs.open_output_stream(key) as out:
            out.write(data)

    def stop(self) -> None:
        self.network.stop()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
