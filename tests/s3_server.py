"""The loopback SeaweedFS S3 harness for tests; it lives in tools/s3_server.py so tools/bench_remote.py shares it."""

from tools.s3_server import S3ServerError, SeaweedS3, free_ports

__all__ = ["S3ServerError", "SeaweedS3", "free_ports"]
