"""Build script for the `tg_kernels._C` extension (C++ CPU kernels, plus CUDA kernels where possible).

Switches (environment variables):

- ``TG_KERNELS_CUDA``: ``1`` forces the CUDA part (error if no toolkit), ``0`` builds CPU only,
  unset builds CUDA when torch is a CUDA build and a CUDA toolkit is found.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures; without a visible GPU it defaults to ``8.0;9.0``.
- ``MAX_JOBS``: parallel compile jobs; by default limited by cores and by memory (nvcc is hungry).
- ``CUDA_HOME``: the CUDA toolkit; by default found from ``nvcc`` or the conventional locations.

Always build with ``--no-build-isolation`` so the installed torch is the one compiled against.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "tg_kernels"
DEFAULT_ARCH_LIST = "8.0;9.0"
GB_PER_NVCC_JOB = 4  # observed peak resident memory of one nvcc/cicc job on our sources, rounded up
MIN_PYTHON_ABI = "cp310"  # the abi3 wheel's minimum CPython
PY_LIMITED_API_HEX = "0x030A0000"


def _has_cuda_headers(path: Path) -> bool:
    return (path / "include" / "cuda_runtime.h").is_file() and (path / "bin" / "nvcc").exists()


def find_cuda_home() -> Path | None:
    """Locate the CUDA toolkit.

    ``nvcc`` on PATH may be a wrapper script whose folder holds no headers, so every candidate is
    checked for ``include/cuda_runtime.h`` rather than trusted.
    """
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
        # A wrapper script names the real nvcc; take the path it execs.
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for token in text.split():
            if token.endswith("/bin/nvcc") and token.startswith("/"):
                candidates.append(Path(token).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for candidate in candidates:
        if _has_cuda_headers(candidate):
            return candidate
    return None


def _want_cuda(torch_cuda_version: str | None, cuda_home: Path | None) -> bool:
    flag = os.environ.get("TG_KERNELS_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if cuda_home is None:
            sys.exit(
                "error: TG_KERNELS_CUDA=1 but no CUDA toolkit was found: looked at $CUDA_HOME, "
                "$CUDA_PATH, the nvcc on PATH, /usr/local/cuda and /usr/local/cuda-*. "
                "Set CUDA_HOME to a toolkit folder holding include/cuda_runtime.h and bin/nvcc."
            )
        if torch_cuda_version is None:
            sys.exit("error: TG_KERNELS_CUDA=1 but the installed torch is a CPU-only build.")
        return True
    if flag:
        sys.exit(f"error: TG_KERNELS_CUDA must be 0 or 1, got {flag!r}.")
    return torch_cuda_version is not None and cuda_home is not None


def _limit_parallel_jobs() -> None:
    """Cap MAX_JOBS by cores and by memory unless the user set it."""
    if os.environ.get("MAX_JOBS"):
        return
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gb // GB_PER_NVCC_JOB))))


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        rev = out.stdout.strip()
        if rev:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
            return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _read_version() -> str:
    for line in (ROOT / PACKAGE / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in tg_kernels/__init__.py")


def build_extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass); empty when torch is not importable (sdist, metadata only)."""
    cuda_home = find_cuda_home()
    if cuda_home is not None and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME at import time; its own guess trusts the wrapper.
        os.environ["CUDA_HOME"] = str(cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("tg_kernels: torch is not importable, building without the C++ extension", file=sys.stderr)
        return [], {}

    with_cuda = _want_cuda(torch.version.cuda, cuda_home)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    _limit_parallel_jobs()

    info = {
        "version": _read_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_home": str(cuda_home) if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "git_revision": _git_revision(),
    }
    (ROOT / PACKAGE / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"tg_kernels build: {json.dumps(info)}", file=sys.stderr)

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-DPy_LIMITED_API=" + PY_LIMITED_API_HEX]
    define_macros = [("TG_KERNELS_WITH_CUDA", "1" if with_cuda else "0")]
    common = dict(
        name=f"{PACKAGE}._C",
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DPy_LIMITED_API=" + PY_LIMITED_API_HEX]
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extensions()

setup(
    version=_read_version(),
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": MIN_PYTHON_ABI}} if ext_modules else {},
)
