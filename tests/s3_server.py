"""A real S3-compatible server for the S3 tests: s3rver (npm) on 127.0.0.1, started and stopped by PID.

The test set-up installs s3rver itself on first use (`npm install s3rver@3.7.1` into
`$WSSSREC_CACHE/s3rver-3.7.1`, else `~/.cache/wsssrec/s3rver-3.7.1`), so a clean clone needs only npm and
the registry. s3rver keeps its objects on disk, so `restart()` shows what a reader sees when the server
goes away mid-read and comes back.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from data_shards.s3 import reset_client

S3RVER_VERSION = "3.7.1"
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver's fixed credentials
BUCKET = "wsssrec-test"


def _cache_root() -> str:
    return os.environ.get("WSSSREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wsssrec")


def s3rver_binary() -> str:
    """Path of the s3rver executable, installing it with npm when missing (idempotent, atomic)."""
    prefix = os.path.join(_cache_root(), f"s3rver-{S3RVER_VERSION}")
    binary = os.path.join(prefix, "node_modules", ".bin", "s3rver")
    if os.path.exists(binary):
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the S3 tests need npm (Node.js) to install s3rver; install nodejs and npm")
    os.makedirs(_cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"s3rver-{S3RVER_VERSION}-", dir=_cache_root())
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", staging,
                             f"s3rver@{S3RVER_VERSION}"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"npm install s3rver@{S3RVER_VERSION} failed:\n{result.stderr[-2000:]}")
    try:
        os.rename(staging, prefix)  # another session may have won the race: then use theirs
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """One s3rver process serving `data_dir` on 127.0.0.1:`port`."""

    def __init__(self, data_dir: str, buckets: tuple[str, ...] = (BUCKET,)):
        self.binary = s3rver_binary()
        self.data_dir, self.buckets = data_dir, buckets
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(os.path.dirname(data_dir), f"s3rver-{self.port}.log")
        os.makedirs(data_dir, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client of this server needs."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        command = [self.binary, "-d", self.data_dir, "-a", "127.0.0.1", "-p", str(self.port), "--silent"]
        for bucket in self.buckets:
            command += ["--configure-bucket", bucket]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"s3rver exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"s3rver did not listen on port {self.port} within 30 s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop our own process by its PID (SIGKILL simulates a crash)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Kill the server hard and bring it back on the same port with the same data."""
        self.stop(signal.SIGKILL)
        self.start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running s3rver with bucket `wsssrec-test`, and the AWS environment of this process pointing at it.

    Tests that stop or restart it must leave it running."""
    server = S3Server(str(tmp_path_factory.mktemp("s3rver") / "data"))
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in server.env.items():
            patch.setenv(name, value)
        reset_client()  # a client cached earlier would still point elsewhere
        try:
            yield server
        finally:
            server.stop()
            reset_client()
