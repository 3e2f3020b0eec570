"""The docs: the site builds with `mkdocs build --strict` (no broken link or anchor), the B3Job
field reference is the generator's output and names every field of the spec, and the README
stays one screen that points into the docs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from b3_operator import reference

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "b3job.md"


def test_the_field_reference_is_generated_from_the_spec():
    assert PAGE.read_text() == reference.render(), (
        "docs/reference/b3job.md is stale: python -m b3_operator.reference > docs/reference/b3job.md")


def test_every_field_of_the_spec_has_a_row_under_its_objects_heading():
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", PAGE.read_text(), re.S | re.M))
    paths = reference.field_paths()
    assert len(paths) > 80  # the whole spec, nested objects included
    for path in paths:
        parent, name = re.match(r"(.*)\.([^.]+)$", path).groups()
        assert f"| `{name}` |" in sections.get(parent, ""), f"{path}: no row under '## {parent}'"


def test_a_field_the_page_lacks_fails_the_check(monkeypatch):
    from b3_operator import crd

    real = crd.spec_schema

    def with_a_new_field():
        schema = real()
        schema["properties"]["mining"]["properties"]["newKnob"] = {"type": "integer", "description": "new"}
        return schema

    monkeypatch.setattr(reference, "spec_schema", with_a_new_field)
    assert "spec.mining.newKnob" in reference.field_paths()
    assert reference.render() != PAGE.read_text()


def test_the_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    if mkdocs is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs is missing: pip install the dev extra")
        pytest.skip("needs mkdocs (the dev extra)")
    built = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "b3job" / "index.html").exists()


def test_the_readme_is_one_screen_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 45
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 8
    for link in links:
        assert (ROOT / link).exists(), link
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"
