"""Start one container of the node double: inside a private mount namespace (the node double
runs `unshare --mount --propagation private -- python pod_launcher.py PLAN`), bind each
prepared folder or file at its path, then exec the container's command.

PLAN (JSON): {"mounts": [[source, target, read_only], ...], "image": [path, ...],
"workingDir": str | null, "command": [...], "env": {...}}. `image` are the paths that stand in
for the container image (this checkout and its Python): a volume mounted over one of their
parents (an emptyDir at /tmp over a checkout under /tmp) must not hide them, as it would not
hide an image's /app, so they are bound back at their own paths after the volumes. Mounts are applied in order (parents before what they hold:
/dev, a private copy with the termination-log file, before /dev/shm). Every source is opened
before the first mount and bound through its file descriptor, so that a mount over a source's
parent (an emptyDir at /tmp over a node folder under /tmp) cannot hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def bind(fd: int, is_dir: bool, target: str, read_only: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()  # a file mount point (inside the private /dev, or new)
    # recursive for folders: the private /dev carries the device files bound into it
    flag = "--rbind" if is_dir else "--bind"
    # --no-canonicalize: mount(8) would otherwise resolve the fd's link text as a path in
    # today's mounts, which for a path under a fresh emptyDir is the empty mount point itself
    subprocess.run(["mount", "--no-canonicalize", flag, f"/proc/self/fd/{fd}", target],
                   check=True, pass_fds=(fd,))  # fmt: skip
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    targets = [target for _, target, _ in plan["mounts"]]
    hidden = [p for p in plan["image"] if any(os.path.commonpath([p, t]) == t != p for t in targets)]
    mounts = [*plan["mounts"], *([p, p, False] for p in hidden)]
    sources = [(os.open(source, os.O_PATH), os.path.isdir(source)) for source, _, _ in mounts]
    for (fd, is_dir), (_, target, read_only) in zip(sources, mounts, strict=True):
        os.set_inheritable(fd, True)
        bind(fd, is_dir, target, read_only)
    if plan.get("workingDir"):
        os.chdir(plan["workingDir"])
    command = plan["command"]
    try:
        os.execvpe(command[0], command, plan["env"])
    except OSError as err:  # what a runtime reports as StartError
        print(f"node double: cannot start {command[0]!r}: {err}", file=sys.stderr)
        sys.exit(128)


if __name__ == "__main__":
    main()
