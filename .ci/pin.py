"""Write constraints.txt: the installed version of every package the project's extras pull in.

    python -m pip install torch==2.13.0 -e '.[dev,bench,teacher,operator,datasets,kuberay]'   # then check it works
    python .ci/pin.py > constraints.txt

CI and the README's commands install with `-c constraints.txt`, so a new release upstream
cannot turn CI red overnight; pyproject.toml keeps ranges for users. Re-pin on purpose: bump,
run the tests and `python bench/train_throughput.py --steps 2`, commit both.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

ROOT_PACKAGE = "b3-operator"
EXTRAS = {"dev", "bench", "teacher", "operator", "datasets", "kuberay"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[;<>=!~(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(package: str, extras: set[str]) -> dict[str, str]:
    """{name: installed version} of `package`'s requirements (with `extras`), transitively;
    environment markers are evaluated for this interpreter."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()  # a package again with other extras: go on
    todo = [(package, extras)]
    while todo:
        name, wanted = todo.pop()
        if (name, frozenset(wanted)) in visited:
            continue
        visited.add((name, frozenset(wanted)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (wanted or {""})
            ):
                continue
            dep = _name(req.name)
            try:
                seen[dep] = metadata.version(dep)
            except metadata.PackageNotFoundError:
                continue
            todo.append((dep, set(req.extras)))
    seen.pop(ROOT_PACKAGE, None)
    return seen


def main() -> None:
    pins = closure(ROOT_PACKAGE, EXTRAS)
    print("# Known-good versions for CI and the README commands; regenerate with .ci/pin.py.")
    print(f"# Python {sys.version_info.major}.{sys.version_info.minor}, {len(pins)} packages.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
