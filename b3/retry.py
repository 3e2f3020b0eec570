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

import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from b3.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a fault is retried, from the first failure, whatever a client spends per attempt:
# pyarrow's S3 client retries on its own first (about 6 s against a store that refuses
# connections, but 0 ms when it gives up at once), so the budget is time, not a count of tries.
# Half a minute rides out a restarting gateway or a dropped connection; a store down for good
# fails the stage soon after, and the Job's own retry (a fresh pod, after the Job controller's
# backoff) takes over from there. The pause doubles from FIRST_PAUSE up to MAX_PAUSE.
RETRY_SECONDS = 30.0
FIRST_PAUSE, MAX_PAUSE = 1.0, 8.0

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


def retrying(what: str, call: Callable[[], T], budget: float | None = None) -> T:
    """`call()`, tried again after each transient failure until `budget` seconds (RETRY_SECONDS)
    have passed since the first try, the last try at the end of it; then TransientError
    naming `what`, the attempts and the last error. Any other error is raised at once."""
    budget = RETRY_SECONDS if budget is None else budget
    started, pause = time.monotonic(), FIRST_PAUSE
    for attempt in itertools.count(1):
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            spent = time.monotonic() - started
            if spent >= budget:
                raise TransientError(
                    f"{what}: still failing after {attempt} attempts over {spent:.0f} s "
                    f"({_one_line(err)}); a transient fault (network or object store), so the "
                    "stage may be retried"
                ) from err
            wait = min(pause * (1 + random.random() / 4), budget - spent)
            log.warning("%s: %s; retrying in %.1f s (attempt %d, %.0f s of %.0f s spent)", what,
                        _one_line(err), wait, attempt + 1, spent, budget)  # fmt: skip
            time.sleep(wait)
            pause = min(2 * pause, MAX_PAUSE)
    raise AssertionError("unreachable")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:400] or type(err).__name__
