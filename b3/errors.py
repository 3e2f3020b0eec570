"""Errors the stage programs turn into exit codes without importing the stages themselves."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is not finite); the last good checkpoint stays.
    Exit code 1, with the message in the pod's termination log."""


class TrainingStopped(RuntimeError):
    """Training was asked to stop (SIGTERM: preemption, eviction, a suspended Job) and wrote a
    checkpoint at the current step first; a rerun resumes there. Exit code 143 (128 + SIGTERM)."""

    exit_code = 143
