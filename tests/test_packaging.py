"""Install metadata, the build's dependencies and the compiled extension's load checks (issue 13)."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

from glrec_fast import _backend, ops

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pins(path: pathlib.Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_build_torch_is_the_runtime_torch():
    # An isolated build must compile _C against the torch requirements.txt installs.
    runtime = _pins(REPO / "requirements.txt")["torch"]
    build = re.search(r'requires\s*=\s*\[([^\]]*)\]', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"torch=={runtime}"' in build, (runtime, build)


def test_triton_pinned_only_for_cpu_torch():
    # A CUDA torch pins its own triton (torch 2.13.0: 3.7.1); requirements.txt must not pin another.
    assert "triton" not in _pins(REPO / "requirements.txt")
    assert "triton" in _pins(REPO / "requirements-cpu.txt")


@pytest.mark.parametrize("source", ["csrc/sampling/sampling_common.h", "csrc/sampling/cuda/neighbor_sample_cuda.cu",
                                    "csrc/propagate/propagate_cpu.cpp", "kernels/propagate.py", "pyproject.toml"])
def test_makefile_rebuilds_when_a_source_changes(tmp_path, source):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    stamp = tmp_path / ".glrec-installed"
    stamp.touch()
    later = stamp.stat().st_mtime + 3600
    os.utime(stamp, (later, later))       # the stamp is newer than every source: nothing to do
    run = lambda *a: subprocess.run(["make", "-n", f"VENV={tmp_path}", *a, str(stamp)], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    assert "pip install" not in run()
    assert "pip install" in run("-W", source)  # as if the source had just changed


def test_version_mismatch_names_both_versions():
    assert _backend.version_mismatch("2.13.0+cpu", "2.13.0+cu130") is None
    why = _backend.version_mismatch("2.12.1", "2.13.0+cpu")
    assert "2.12.1" in why and "2.13.0+cpu" in why
    assert "does not record" in _backend.version_mismatch(None, "2.13.0")


@pytest.mark.skipif(ops._C is None, reason="compiled extension not built")
def test_extension_records_its_torch():
    assert ops._C.torch_version == torch.__version__
    assert isinstance(ops._C.openmp, bool)


@pytest.mark.skipif(ops._C is None, reason="compiled extension not built")
def test_extension_for_another_torch_is_refused():
    # The real _C, loaded under a torch that reports another version: refused with the rebuild
    # command, and every op is served (correctly) by the reference instead.
    code = textwrap.dedent("""
        import warnings, torch
        torch.__version__ = "2.99.0"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from glrec_fast import ops, reference
            from glrec_fast.graph import BipartiteGraph
        msgs = [str(x.message) for x in w if "glrec_fast._C" in str(x.message)]
        assert ops._C is None and len(msgs) == 1, msgs
        assert "2.99.0" in msgs[0] and ops._backend.REBUILD in msgs[0], msgs
        assert all(k["CPU"] == "reference" for k in ops.KERNELS.values()), ops.KERNELS
        g = BipartiteGraph.from_interactions(torch.tensor([[0, 0], [1, 1], [1, 0]]), 2, 2)
        x = torch.randn(4, 3)
        assert torch.allclose(ops.propagate(g, x, 2), reference.propagate(g, x, 2))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed (Debian: apt-get install clang)")
def test_clang_build_works(tmp_path):
    # setup.py's compiler probes: clang without an OpenMP it can link builds serial loops and says
    # so; with one it builds threaded. Either way the kernels must equal the reference.
    for name in ("csrc", "kernels", "glrec_fast", "setup.py", "pyproject.toml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    for so in (tmp_path / "glrec_fast").glob("_C*"):
        so.unlink()
    env = dict(os.environ, CC="clang", CXX="clang++", MAX_JOBS="2")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-4000:]
    assert "clang++" in build.stdout + build.stderr
    code = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from glrec_fast import ops, reference, sampling
            from glrec_fast.graph import BipartiteGraph
        assert ops._C is not None and ops._C.__file__.startswith(%r), ops._C
        serial = [str(x.message) for x in w if "built without OpenMP" in str(x.message)]
        assert (len(serial) == 1) == (not ops._C.openmp), serial
        assert ops.KERNELS["propagate"]["CPU"] == "C++ (_C)"
        g = BipartiteGraph.from_interactions(torch.randint(0, 50, (400, 2)), 50, 50)
        x = torch.randn(100, 16, requires_grad=True)
        out = ops.propagate(g, x, 3)
        ref = reference.propagate(g, x.detach(), 3)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        assert ops.KERNELS["dense_layer"]["CPU"] == "C++ (_C)"   # GCC vector extensions, as clang reads them
        x2, w2, b2 = torch.randn(37, 48), torch.randn(80, 48) * 0.2, torch.randn(80)
        out = ops.dense_layer(x2, w2, b2, tanh=True)
        ref = reference.dense_layer(x2, w2, b2, True)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        print("ok", ops._C.openmp)
    """ % str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def _package_imports() -> dict[str, set[str]]:
    """glrec_fast module -> the glrec_fast modules it imports, at top level or inside a function."""
    import ast
    root = REPO / "glrec_fast"
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for a in node.names:
                    t = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    if t in mods and t != m:
                        edges[m].add(t)
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return edges


def test_no_import_cycles():
    edges = _package_imports()
    assert "glrec_fast.reference" in edges["glrec_fast.ops"]       # the walk sees relative imports
    assert "glrec_fast.train" in edges["glrec_fast"]               # and imports inside functions

    def reaches(src, dst, seen):
        return any(n == dst or (n not in seen and not seen.add(n) and reaches(n, dst, seen)) for n in edges[src])
    cycles = sorted(m for m in edges if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_sdist_carries_every_extension_source(tmp_path):
    # setup.py lists only the .cpp files it compiles; headers and CUDA sources reach an sdist through
    # MANIFEST.in, without which an sdist build fails on its first #include "../common/...".
    # egg_info into tmp_path: a SOURCES.txt left in the tree by an earlier build would carry its file list.
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "sdist", "-d", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    (archive,) = tmp_path.glob("glrec_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {pathlib.PurePosixPath(*pathlib.PurePosixPath(n).parts[1:]).as_posix() for n in tar.getnames()}
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= shipped, sorted(sources - shipped)
