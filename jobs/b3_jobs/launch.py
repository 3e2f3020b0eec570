"""torchrun that keeps a worker's exit code: `python -m b3_jobs.launch <torchrun arguments>`.

torchrun reports any failed worker as its own exit code 1, so a training pod whose worker
stopped on bad input (exit 2, the message already in the termination log) would look like a
crash: the Job's podFailurePolicy rule for exit 2 would never match, and the operator would
restart the gang on input that fails every time. This runs torchrun's own entry point and
exits 2 when any local worker did, 143 when workers stopped on SIGTERM after checkpointing
(the others killed by torchrun, none failed), 75 when a worker met a lasting network or
object-store fault (retried: the gang restarts), and 1 for any other failure; stopped itself
(the pod deleted: torchrun passes SIGTERM to its workers, which checkpoint), 128 + the signal.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from b3.data import EXIT_BAD_INPUT
from b3.errors import TrainingStopped, TransientError

EXIT_STOPPED = TrainingStopped.exit_code
EXIT_TRANSIENT = TransientError.exit_code


def exit_code(worker_codes: set[int]) -> int:
    """The pod's exit code from its workers' codes (a negative code: killed by that signal)."""
    if EXIT_BAD_INPUT in worker_codes:
        return EXIT_BAD_INPUT
    if EXIT_STOPPED in worker_codes and all(c == EXIT_STOPPED or c < 0 for c in worker_codes):
        return EXIT_STOPPED  # stopped and checkpointed; the agent killed the rest
    if EXIT_TRANSIENT in worker_codes and all(c == EXIT_TRANSIENT or c < 0 for c in worker_codes):
        return EXIT_TRANSIENT
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        return exit_code({failure.exitcode for failure in err.failures.values()})
    except SignalException as err:  # the pod was stopped: torchrun stopped its workers first
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
