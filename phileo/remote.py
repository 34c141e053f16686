"""The remote-I/O policy both stages share: which errors are worth retrying, how long to wait, the S3 client.

The build's reads (sharding/sources/remote.py: parquet footers and row groups over s3://,
http(s):// and hf://) and the trainer's shard streams (training/data/remote.py) retry the same
errors with the same backoff, and make their S3 clients the same way. Transient: network trouble
(resets, refusals, timeouts, truncated bodies, DNS failures) and server overload (HTTP 408, 425,
429, 5xx). Permanent: missing objects, bad requests, credentials, and a host name that does not
exist (a typo fails at once instead of after ~20 s of retries).

Environment knobs: PHILEO_REMOTE_RETRIES (default 6), PHILEO_REMOTE_BACKOFF_S (first delay, default
0.5 s, doubled per failure up to 30 s). S3 takes the standard AWS environment (AWS_ENDPOINT_URL_S3
or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; never logged).
"""

from __future__ import annotations

import errno
import http.client
import os
import random
import socket
import urllib.error
from dataclasses import dataclass

RETRY_STATUS = frozenset({408, 425, 429})  # plus every 5xx
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_MODULES = frozenset({"aiohttp", "botocore", "aiobotocore", "requests", "urllib3", "asyncio", "httpx",
                               "httpcore"})  # their exceptions without an HTTP status: network trouble
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # consecutive failures (without progress) before giving up
    backoff_s: float = 0.5
    max_backoff_s: float = MAX_BACKOFF_S

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(int(os.environ.get("PHILEO_REMOTE_RETRIES", cls.retries)),
                   float(os.environ.get("PHILEO_REMOTE_BACKOFF_S", cls.backoff_s)))

    def delay(self, failure: int, error: BaseException | None = None) -> float:
        """Exponential backoff with jitter in [d/2, d] (workers do not retry in lockstep), or longer when
        the server's Retry-After asks for it (the Hub's 429)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (failure - 1))
        return max(random.uniform(ceiling / 2, ceiling), retry_after_s(error) if error is not None else 0.0)


def http_status(error: BaseException) -> int | None:
    """The HTTP status an exception of urllib, aiohttp, botocore, huggingface_hub/httpx or requests carries."""
    status = getattr(error, "status", None) or getattr(error, "code", None)
    response = getattr(error, "response", None)
    if status is None and isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    elif status is None and response is not None:  # huggingface_hub / httpx / requests
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(error: BaseException) -> bool:
    """Worth retrying: network trouble and server overload, not missing objects, bad requests or credentials."""
    status = http_status(error)
    if status is not None and (status >= 400 or isinstance(error, urllib.error.HTTPError)):
        return status in RETRY_STATUS or status >= 500
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        # fsspec's HTTP size lookup turns every failure (a 503, a refused connection) into
        # FileNotFoundError: judge the cause, so an overloaded server is not a missing file
        return is_transient(error.__cause__)
    if isinstance(error, PERMANENT_ERRORS) or (isinstance(error, OSError) and error.errno == errno.EINVAL):
        return False
    if unknown_host(error):
        return False
    if isinstance(error, (OSError, http.client.HTTPException, TimeoutError)):
        return True
    if _credential_error(error):
        return False
    return type(error).__module__.split(".")[0] in TRANSIENT_MODULES


def unknown_host(error: BaseException) -> bool:
    """DNS answered that the host does not exist (EAI_NONAME); a DNS failure (EAI_AGAIN) is still transient."""
    # urllib wraps the socket error in `reason`, others chain it
    candidates = [error, getattr(error, "reason", None), error.__cause__, error.__context__]
    return any(isinstance(candidate, socket.gaierror) and candidate.errno == socket.EAI_NONAME
               for candidate in candidates)


def _credential_error(error: BaseException) -> bool:
    try:
        import botocore.exceptions as boto
    except ImportError:  # s3 support not installed
        return False
    return isinstance(error, (boto.NoCredentialsError, boto.PartialCredentialsError, boto.ParamValidationError))


def retry_after_s(error: BaseException) -> float:
    """Seconds from an HTTP Retry-After header (delta-seconds form) on the error's response, capped; else 0."""
    response = getattr(error, "response", None)
    headers = getattr(error, "headers", None) or getattr(response, "headers", None) or {}
    value = (headers.get("Retry-After") or headers.get("retry-after")) if hasattr(headers, "get") else None
    try:
        return min(max(float(value), 0.0), MAX_BACKOFF_S * 4) if value is not None else 0.0
    except (TypeError, ValueError):  # the HTTP-date form: fall back to our backoff
        return 0.0


_S3_FILESYSTEMS: dict[tuple, object] = {}  # (pid, endpoint, key id, secret, token) -> s3fs.S3FileSystem


def s3_filesystem():
    """The s3fs file system for the current AWS environment, one per process and environment.

    Instances are kept for good, including those a forked DataLoader worker inherits from its
    parent: a child must never close (finalize) a client whose event loop ran in the parent's I/O
    thread; it makes its own instead.
    """
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    credentials = {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ.get("AWS_SECRET_ACCESS_KEY"),
                   "token": os.environ.get("AWS_SESSION_TOKEN")} if "AWS_ACCESS_KEY_ID" in os.environ else {}
    cache_key = (os.getpid(), endpoint, *credentials.values())
    if cache_key not in _S3_FILESYSTEMS:
        _S3_FILESYSTEMS[cache_key] = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                                                       **credentials)
    return _S3_FILESYSTEMS[cache_key]
