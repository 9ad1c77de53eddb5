"""The venv holds exactly the versions in the lock files (`./run` installs from them; `./run lock` remakes them)."""
from __future__ import annotations

import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = [ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "data-lock.txt"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line of a pip requirements file."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;\\]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def mismatches(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: locked X, installed Y' (or 'not installed') for every locked package the venv does not match."""
    bad = []
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have != version:
            bad.append(f"{name}: locked {version}, installed {have or 'nothing'}")
    return bad


def installed_versions() -> dict[str, str]:
    """What the venv's site-packages hold. Not `sys.path`: importing setuptools (torch.compile's C++ builder does)
    appends its `_vendor` folder, whose older packaging, zipp, wheel ... would then shadow the installed ones."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths) if d.metadata["Name"]}


def test_the_venv_matches_the_lock():
    locked = {}
    for lock in LOCKS:
        locked.update(pins(lock.read_text()))
    assert len(locked) > 100 and locked["torch"] == "2.13.0+cpu"
    bad = mismatches(locked, installed_versions())
    assert not bad, ("the venv differs from the lock (rerun ./run to rebuild it, or ./run lock after changing "
                     "pyproject.toml): " + "; ".join(bad))


def test_a_changed_version_is_named():
    locked = pins(LOCKS[0].read_text())
    venv = dict(locked)
    assert mismatches(locked, venv) == []
    venv["numpy"] = "1.0.0"
    del venv["pandas"]
    assert mismatches(locked, venv) == [f"numpy: locked {locked['numpy']}, installed 1.0.0",
                                        f"pandas: locked {locked['pandas']}, installed nothing"]


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_locked_package_has_a_hash(lock):
    """pip installs with --require-hashes: a lock line without a hash would stop the set-up."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    pinned = [e for e in entries if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*==", e)]
    assert pinned and all("--hash=sha256:" in e for e in pinned)
