"""Transient faults: which errors are a passing network or object-store fault, and retrying
them with bounded backoff.

A dropped connection, a timeout or an object store's 5xx / SlowDown says nothing about the
input: the same read may work a second later. Such errors are retried here; when they
persist, `TransientError` leaves the stage with EXIT_TRANSIENT (75), which the stage Job's
podFailurePolicy retries and a training gang's restart counts, never with exit 2 (bad input:
fail at once). Errors that would repeat on every try (no such key, access denied, a file
that does not parse) are not transient and pass through unchanged.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from b3.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds slept before each retry (and a jitter of up to a quarter on top). pyarrow's S3 client
# retries on its own first (3 attempts, about 6 s against a store that refuses connections), so
# four tries here ride out some 30 s of outage, a restarting gateway or a dropped connection,
# and a store down for good fails the stage within about half a minute: the Job's own retry (a
# fresh pod, after the Job controller's backoff) takes over from there.
RETRY_DELAYS = (1.0, 2.0, 4.0)

# What pyarrow's S3/GCS/HDFS clients, urllib3 and httpx say of a passing fault. pyarrow's S3
# errors read "AWS Error <CODE> during <Op> operation: ..." with the SDK's error code; curl codes
# 6/7 (cannot resolve / connect), 18 (partial file), 28 (timeout), 52/56 (empty reply / recv).
_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
    "THROTTLING", "REQUEST_TIME_TOO_SKEWED", "HTTP status 500", "HTTP status 502", "HTTP status 503",
    "HTTP status 504", "curlCode: 6,", "curlCode: 7,", "curlCode: 18,", "curlCode: 28,", "curlCode: 52,",
    "curlCode: 55,", "curlCode: 56,", "Connection reset", "Connection refused", "Broken pipe",
    "timed out", "Timeout was reached", "Temporary failure in name resolution", "Network is unreachable",
    "Couldn't connect to server", "Remote end closed connection",
)  # fmt: skip


# HTTP clients' own classes of connect, read and timeout failures (the Hugging Face hub client
# is httpx2, a fork of httpx; by name, so that none of them need be installed)
_HTTP_CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
_HTTP_TRANSPORT_ERRORS = ("TransportError", "NetworkError", "TimeoutException", "ConnectError",
                          "ConnectionError", "Timeout", "ProtocolError", "NewConnectionError")  # fmt: skip


def is_transient(err: BaseException) -> bool:
    """Whether `err` is a passing network or object-store fault (worth another try)."""
    if isinstance(err, TransientError):
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _HTTP_TRANSPORT_ERRORS and cls.__module__.split(".")[0] in _HTTP_CLIENTS
           for cls in type(err).__mro__):  # fmt: skip
        return True
    text = str(err)
    return isinstance(err, OSError) and any(marker in text for marker in _TRANSIENT_MARKERS)


def retrying(what: str, call: Callable[[], T], delays: tuple[float, ...] | None = None) -> T:
    """`call()`, tried again after each transient failure with the delays of RETRY_DELAYS;
    TransientError (naming `what`, the attempts and the last error) once they are spent.
    Any other error is raised at once."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == len(delays):
                raise TransientError(
                    f"{what}: still failing after {attempt + 1} attempts over "
                    f"{sum(delays):.0f} s ({_one_line(err)}); a transient fault (network or object "
                    "store), so the stage may be retried"
                ) from err
            pause = delays[attempt] * (1 + random.random() / 4)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, _one_line(err), pause,
                        attempt + 2, len(delays) + 1)  # fmt: skip
            time.sleep(pause)
    raise AssertionError("unreachable")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:400] or type(err).__name__
