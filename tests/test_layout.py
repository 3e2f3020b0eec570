"""The repository root is safe for `python -m ...` in a fresh virtual environment.

Under `python -m`, the current folder comes first on sys.path. In a new venv (no .pth files
yet) Python's own `operator` module has not been imported when runpy starts, so a folder at
the root importable as `operator` shadows it and every `python -m pip` / `python -m pytest`
there dies ("cannot import name 'eq' from 'operator'"). The packages live one level down
(operator/b3_operator/, jobs/b3_jobs/) for that reason.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB_NAMES = sys.stdlib_module_names


def test_python_m_pip_runs_from_the_root_of_a_fresh_venv(tmp_path):
    venv.EnvBuilder(with_pip=True, symlinks=True).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    ran = subprocess.run([str(python), "-m", "pip", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    which = subprocess.run([str(python), "-c", "import operator; print(operator.__file__)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert which.returncode == 0 and not which.stdout.strip().startswith(str(ROOT)), which.stdout


def test_no_folder_or_module_at_the_root_shadows_the_standard_library():
    shadows = sorted(
        entry.name for entry in ROOT.iterdir()
        if entry.name.removesuffix(".py") in STDLIB_NAMES
        and ((entry.is_dir() and (entry / "__init__.py").exists()) or entry.suffix == ".py")
    )  # fmt: skip
    assert not shadows, f"importable from the repository root, shadowing the standard library: {shadows}"


def test_the_installed_packages_are_the_folders_one_level_down():
    import b3_jobs
    import b3_operator

    assert Path(b3_operator.__file__).parent == ROOT / "operator" / "b3_operator"
    assert Path(b3_jobs.__file__).parent == ROOT / "jobs" / "b3_jobs"
