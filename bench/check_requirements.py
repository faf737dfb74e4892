"""Does requirements.txt resolve on a CUDA Linux machine from the public index? (issue 13)

The CPU machines this project is developed on take torch from a wheel on disk; a user's Linux
machine takes the CUDA build from PyPI, which pins its own companions (triton, the nvidia-* wheels).
This asks the package index, for the CUDA platform (manylinux x86_64, CPython 3.11), what every
line of requirements.txt resolves to (pip's dry run, no download of the wheels), then checks each
resolved package's own requirements, evaluated for that platform, against our pins: a pin that
one of them excludes (e.g. ``triton==3.9.0`` beside torch 2.13.0's ``triton==3.7.1``) is a
conflict pip would refuse on that machine.

    python bench/check_requirements.py [--requirements requirements.txt] [--index-url URL]

Exit 0: no conflict (or the index is unreachable: then it says SKIPPED and why); 1: conflicts,
each named; 2: a requirement does not exist for the platform. Needs the network to the index
only; the .ci/run step runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# A current Linux (glibc 2.39) accepts every manylinux tag up to its glibc, and pure-Python wheels.
PLATFORM_TAGS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + ["manylinux2014_x86_64"]
TARGET_ENV = dict(default_environment(), sys_platform="linux", platform_system="Linux", os_name="posix",
                  platform_machine="x86_64", python_version="3.11", python_full_version="3.11.7",
                  implementation_name="cpython", platform_python_implementation="CPython")


def read_requirements(path: str) -> list[Requirement]:
    reqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                reqs.append(Requirement(line))
            except Exception as e:
                raise SystemExit(f"{path}:{lineno}: not a requirement line: {line!r} ({e})")
    return reqs


def resolve(reqs: list[Requirement], index_url: str) -> dict:
    """pip's dry-run report of the top-level requirements for the CUDA platform (no dependencies)."""
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "report.json")
        cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-deps", "--ignore-installed",
               "--target", os.path.join(d, "t"), "--python-version", "3.11", "--only-binary=:all:",
               "--index-url", index_url, "--report", report, "--quiet"]
        for tag in PLATFORM_TAGS:
            cmd += ["--platform", tag]
        proc = subprocess.run(cmd + [str(r) for r in reqs], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()}
        with open(report) as f:
            return json.load(f)


def conflicts(reqs: list[Requirement], report: dict) -> list[str]:
    """Each (package -> dependency) requirement, for the target platform, that excludes our pin."""
    ours = {canonicalize_name(r.name): r for r in reqs}
    resolved = {canonicalize_name(it["metadata"]["name"]): it["metadata"]["version"] for it in report["install"]}
    found = []
    for it in report["install"]:
        meta = it["metadata"]
        for line in meta.get("requires_dist") or []:
            dep = Requirement(line)
            if dep.marker is not None and not dep.marker.evaluate(dict(TARGET_ENV, extra="")):
                continue
            name = canonicalize_name(dep.name)
            if name in resolved and not dep.specifier.contains(resolved[name], prereleases=True):
                found.append(f"{meta['name']} {meta['version']} requires {line!r}, but requirements.txt "
                             f"gives {name} {resolved[name]} ({ours[name]})")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requirements", default=os.path.join(os.path.dirname(__file__), "..", "requirements.txt"))
    p.add_argument("--index-url", default="https://pypi.org/simple")
    a = p.parse_args(argv)
    reqs = read_requirements(a.requirements)
    try:
        report = resolve(reqs, a.index_url)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"SKIPPED: pip could not run against {a.index_url}: {e!r}")
        return 0
    if "error" in report:
        err = report["error"]
        if any(s in err for s in ("Network is unreachable", "Failed to establish", "Temporary failure in name",
                                  "Max retries exceeded", "Could not fetch URL")):
            print(f"SKIPPED: the index {a.index_url} is unreachable from here:\n{err[-600:]}")
            return 0
        print(f"requirements.txt does not resolve for the CUDA platform (manylinux x86_64, CPython 3.11):\n{err}")
        return 2
    bad = conflicts(reqs, report)
    names = ", ".join(f"{it['metadata']['name']}=={it['metadata']['version']}" for it in report["install"])
    if bad:
        print("CONFLICTS for the CUDA platform:\n  " + "\n  ".join(bad))
        return 1
    print(f"OK: requirements.txt resolves for the CUDA platform with no pin conflicts ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
