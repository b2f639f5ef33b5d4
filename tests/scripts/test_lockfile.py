"""requirements.lock against pyproject.toml: every requirement pinned, inside its range."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RELOCK = "re-lock with `bash scripts/lock.sh` (docs/dependencies.md)"


def _lockfile():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    """Every line of the lock, whatever its platform marker: name -> version."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != "vieval-runner"]


def test_lock_pins_every_requirement_of_the_package_and_its_extras_in_range():
    pins = _pins()
    assert "torch" in pins and "torchvision" in pins  # torch is part of the tested set
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml needs {req} but requirements.lock lacks it: {RELOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: {RELOCK}"
        )


@pytest.mark.parametrize("name", ["torch", "transformers", "peft", "deltalake"])
def test_libraries_whose_internals_the_code_uses_have_an_upper_bound(name):
    (req,) = [r for r in _requirements() if canonicalize_name(r.name) == name]
    assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), req


def test_platform_only_dependencies_get_a_marker():
    lockfile = _lockfile()
    linux = {("linux", "x86_64"), ("linux", "aarch64")}
    assert lockfile.platform_marker(linux) == 'sys_platform == "linux"'
    assert lockfile.platform_marker({("linux", "x86_64"), ("win32", "AMD64")}) == (
        '(sys_platform == "linux" and platform_machine == "x86_64") or sys_platform == "win32"'
    )
    # torch's CUDA wheels are Linux-only in torch's metadata: pip skips them elsewhere
    cuda = [
        line for line in (ROOT / "requirements.lock").read_text().splitlines() if "nvidia-" in line
    ]
    assert all(line.endswith('; sys_platform == "linux"') for line in cuda)


def test_versions_note_names_the_locked_versions_and_what_moved():
    from vieval_runner.testing.fixtures import versions_note

    pins = _pins()
    note = versions_note()
    written = note.split(";")[0]
    assert written == "written for " + ", ".join(
        f"{name} {pins[name]}" for name in ("transformers", "peft", "torch")
    )
    assert "now: transformers " in note
