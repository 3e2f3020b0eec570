"""Errors the stage programs turn into exit codes without importing the stages themselves."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is not finite); the last good checkpoint stays.
    Exit code 1, with the message in the pod's termination log."""


class TrainingStopped(RuntimeError):
    """Training was asked to stop (SIGTERM: preemption, eviction, a suspended Job) and wrote a
    checkpoint at the current step first; a rerun resumes there. Exit code 143 (128 + SIGTERM)."""

    exit_code = 143


class TransientError(Exception):
    """A network or object-store fault that outlasted the retries of `b3.retry`: the input may
    be fine, so this is not bad input. Exit code 75 (EX_TEMPFAIL), which the stage Job retries
    (backoffLimit) and a training gang's restart counts; never 2. Not an OSError, so that no
    handler of unreadable input mistakes it for one."""

    exit_code = 75
