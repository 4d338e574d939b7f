"""S3 I/O with boto3 for `s3://bucket/key` URLs: a resuming reader, a multipart writer, listing and sizes.

Endpoint and credentials come only from the standard AWS environment and config files (`AWS_ENDPOINT_URL`,
`AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, ...); nothing here prints or logs them. Transient failures (connection
errors, timeouts, 5xx, throttling) are retried with exponential backoff; a read that breaks mid-object
resumes with a ranged GET from the last byte received. Permanent failures raise `S3Error` naming the URL.
"""
from __future__ import annotations

import functools
import http.client
import importlib
import io
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import DataError

log = logging.getLogger(__name__)

PART_SIZE = 8 * 2**20  # multipart part size (S3 needs >= 5 MiB for every part but the last)
READ_BUFFER = 2**20  # bytes buffered in front of the network stream
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                  "RequestTimeoutException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
                  "InternalError", "ServiceUnavailable"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "403"}
CREDENTIALS_HINT = ("check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                    "~/.aws/credentials) and the endpoint (AWS_ENDPOINT_URL)")

T = TypeVar("T")


class S3Error(DataError):
    """An S3 operation failed for good; `code` is the S3 error code (NoSuchKey, NoSuchBucket, ...) or
    "Unreachable" when retries ran out."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` tries per operation (and per stretch of a read without progress), sleeping
    base_delay * 2^(n-1), at most max_delay, times a random factor in [0.5, 1] between them."""
    attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not is_s3_url(url):
        raise DataError(f"{url} is not an s3:// URL")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise DataError(f"{url} has no bucket name (expected s3://bucket/key)")
    return bucket, key


@functools.lru_cache(maxsize=1)
def _session():
    try:
        import boto3
    except ImportError:
        raise DataError("s3:// URLs need boto3 (pip install boto3)") from None
    return boto3.session.Session()


@functools.lru_cache(maxsize=None)
def _client_for_process(pid: int):
    from botocore.config import Config

    # Retries are ours (one policy for calls and for broken streams), so botocore makes a single attempt.
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=32, tcp_keepalive=True)
    # A forked DataLoader worker makes its own client (connections must not be shared) from the session it
    # inherited, which has the service model loaded already: ~15 ms instead of ~200 ms per worker and epoch.
    return _session().client("s3", config=config)


def client():
    """The S3 client of this process (DataLoader workers are processes: each makes its own)."""
    return _client_for_process(os.getpid())


def reset_client() -> None:
    """Forget the cached clients, so the next call reads the AWS environment again (after it changed)."""
    _client_for_process.cache_clear()
    _session.cache_clear()


def _endpoint() -> str:
    try:
        return client().meta.endpoint_url
    except Exception:  # only used to word an error message
        return "?"


def is_transient(exn: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, a broken stream, 5xx, throttling."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, IncompleteReadError,
                                     ResponseStreamingError)
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exn, ClientError):
        status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or exn.response.get("Error", {}).get("Code") in THROTTLE_CODES
    return isinstance(exn, (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                            Urllib3Error, http.client.HTTPException, ConnectionResetError, TimeoutError,
                            BrokenPipeError, _ShortRead))


def error_for(exn: BaseException, url: str, action: str) -> S3Error:
    """A permanent boto3 failure as an S3Error whose message names the URL and what to check."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exn, (NoCredentialsError, PartialCredentialsError)):
        return S3Error(f"cannot {action} {url}: no AWS credentials found; {CREDENTIALS_HINT}", "NoCredentials")
    if isinstance(exn, ClientError):
        error = exn.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        bucket, _ = split_url(url)
        if code == "NoSuchBucket":
            return S3Error(f"cannot {action} {url}: bucket {bucket!r} does not exist (endpoint {_endpoint()})",
                           code)
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return S3Error(f"cannot {action} {url}: no such object", "NoSuchKey")
        if code in DENIED_CODES or status == 403:
            return S3Error(f"cannot {action} {url}: access denied ({code}); {CREDENTIALS_HINT}", code or "403")
        if code in ("PreconditionFailed", "412"):
            return S3Error(f"cannot {action} {url}: the object changed while it was being read", code)
        return S3Error(f"cannot {action} {url}: {code or status}: {error.get('Message', '')}", code)
    return S3Error(f"cannot {action} {url}: {type(exn).__name__}: {exn}", type(exn).__name__)


def call(action: str, url: str, fn: Callable[[], T], policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """fn() with retries on transient failures; permanent ones become an S3Error naming the URL."""
    for failures in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exn:  # sorted out below: only boto3/network errors are retried
            if isinstance(exn, DataError):
                raise
            if not is_transient(exn):
                raise error_for(exn, url, action) from None
            if failures == policy.attempts:
                raise _gave_up(url, action, failures, exn) from None
            delay = policy.delay(failures)
            log.warning("%s %s failed (%s), retry %d/%d in %.2f s", action, url, type(exn).__name__, failures,
                        policy.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _gave_up(url: str, action: str, failures: int, exn: BaseException) -> S3Error:
    return S3Error(f"cannot {action} {url}: gave up after {failures} attempts ({type(exn).__name__}: {exn}); "
                   f"is the endpoint {_endpoint()} reachable?", "Unreachable")


class _ShortRead(Exception):
    """The server closed the stream before the object's last byte."""


class S3Reader(io.RawIOBase):
    """Reads one object front to back; a stream that breaks is reopened at the next byte (ranged GET,
    If-Match on the first response's ETag so a replaced object is never spliced onto the old one)."""

    def __init__(self, url: str, policy: RetryPolicy = DEFAULT_RETRY):
        super().__init__()
        self.url, self.policy = url, policy
        self.bucket, self.key = split_url(url)
        self.position = 0
        self.size: int | None = None
        self.resumes = 0  # how many times the stream was reopened mid-object
        self._etag: str | None = None
        self._body = None
        call("read", url, self._open, policy)

    def _open(self) -> None:
        request = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            request["Range"] = f"bytes={self.position}-"
        if self._etag:
            request["IfMatch"] = self._etag
        response = client().get_object(**request)
        if self.position and not str(response.get("ContentRange", "")).startswith(f"bytes {self.position}-"):
            response["Body"].close()
            raise S3Error(f"cannot read {self.url}: the server ignored the range request "
                          f"(got {response.get('ContentRange')!r}), so a broken read cannot resume", "NoRange")
        if self.size is None:
            self.size = int(response["ContentLength"])
            self._etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.size is None or self.position >= self.size:
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                    self.resumes += 1
                data = self._body.read(min(len(buffer), self.size - self.position))
                if not data:
                    raise _ShortRead(f"stream ended at byte {self.position} of {self.size}")
                buffer[:len(data)] = data
                self.position += len(data)
                return len(data)
            except Exception as exn:
                if isinstance(exn, DataError):
                    raise
                if not is_transient(exn):
                    raise error_for(exn, self.url, "read") from None
                self._drop_body()
                failures += 1
                if failures >= self.policy.attempts:
                    raise _gave_up(self.url, "read", failures, exn) from None
                delay = self.policy.delay(failures)
                log.warning("reading %s broke at byte %d of %d (%s); resuming with a ranged GET in %.2f s",
                            self.url, self.position, self.size, type(exn).__name__, delay)
                time.sleep(delay)

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # the connection is already broken; closing it is best effort
                pass
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3Writer:
    """Writes one object: a single PUT when small, else a multipart upload in `part_size` parts. The object
    appears only at `close()` (S3 makes both atomic); `abort()` or an exception inside `with` discards it."""

    def __init__(self, url: str, part_size: int = PART_SIZE, policy: RetryPolicy = DEFAULT_RETRY):
        if part_size < 5 * 2**20:
            raise ValueError(f"S3 multipart parts must be at least 5 MiB, got part_size={part_size}")
        self.url, self.part_size, self.policy = url, part_size, policy
        self.bucket, self.key = split_url(url)
        self.closed = False
        self.parts: list[dict] = []
        self._buffer = bytearray()
        self._upload_id: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.closed:
            raise ValueError(f"write to closed S3 object {self.url}")
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            self._upload_part(bytes(self._buffer[:self.part_size]))
            del self._buffer[:self.part_size]
        return len(data)

    def flush(self) -> None:
        pass

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = call("write", self.url, lambda: client().create_multipart_upload(
                Bucket=self.bucket, Key=self.key)["UploadId"], self.policy)
        number = len(self.parts) + 1
        response = call("write", self.url, lambda: client().upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=data), self.policy)
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def close(self) -> None:
        """Commit: the object becomes visible now, whole."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                body = bytes(self._buffer)
                call("write", self.url, lambda: client().put_object(Bucket=self.bucket, Key=self.key, Body=body),
                     self.policy)
            else:
                if self._buffer:
                    self._upload_part(bytes(self._buffer))
                call("write", self.url, lambda: client().complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": self.parts}), self.policy)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._buffer = bytearray()

    def abort(self) -> None:
        """Discard everything written; no object appears."""
        if self.closed:
            return
        self.closed = True
        self._buffer = bytearray()
        if self._upload_id is not None:
            try:
                client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception as exn:  # the upload expires by lifecycle rule anyway; never mask the first error
                log.warning("could not abort the multipart upload of %s (%s)", self.url, type(exn).__name__)

    def __enter__(self) -> "S3Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_s3(url: str, mode: str = "rb", policy: RetryPolicy = DEFAULT_RETRY):
    """A buffered resuming reader ("rb") or an atomic writer ("wb") for one object."""
    if mode == "rb":
        return io.BufferedReader(S3Reader(url, policy), buffer_size=READ_BUFFER)
    if mode == "wb":
        return S3Writer(url, policy=policy)
    raise ValueError(f"cannot open {url} in mode {mode!r}: only 'rb' and 'wb'")


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """The `gopen` handler webdataset calls for s3:// URLs."""
    return open_s3(url, mode)


def register_with_webdataset() -> None:
    """Let webdataset open s3:// shards with `open_s3` (in every process that imports the loader)."""
    # `webdataset.gopen` the attribute is the function; the module holds the scheme table.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3


def size(url: str) -> int | None:
    """Object size in bytes, None when the object does not exist (a missing bucket still raises)."""
    bucket, key = split_url(url)
    try:
        return int(call("stat", url, lambda: client().head_object(Bucket=bucket, Key=key), DEFAULT_RETRY)
                   ["ContentLength"])
    except S3Error as exn:
        if exn.code != "NoSuchKey":
            raise
    # HEAD has no body, so a missing bucket also reads as a bare 404: ask about the bucket itself.
    try:
        call("stat", url, lambda: client().head_bucket(Bucket=bucket))
    except S3Error as exn:
        if exn.code == "NoSuchKey":
            raise S3Error(f"cannot stat {url}: bucket {bucket!r} does not exist (endpoint {_endpoint()})",
                          "NoSuchBucket") from None
        raise
    return None


def list_sizes(prefix_url: str) -> dict[str, int]:
    """Every object under an s3:// prefix -> its size."""
    bucket, prefix = split_url(prefix_url)
    sizes: dict[str, int] = {}
    token = None
    while True:
        request = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = call("list", prefix_url, lambda: client().list_objects_v2(**request))
        for item in page.get("Contents", []):
            sizes[f"s3://{bucket}/{item['Key']}"] = int(item["Size"])
        if not page.get("IsTruncated"):
            return sizes
        token = page["NextContinuationToken"]

