"""Stage programs run in pods (and by `b3 run` locally): thin wrappers around `b3.stages`.

Inside a pod: `python -m b3_jobs.rank /etc/b3/job.yaml` (the operator mounts the resolved
manifest there). Exit codes follow `b3.cli`: 2 for bad input, with the message in the
container's termination log.
"""
