"""The compiled extension: build metadata, CUDA registration, and the fallback when it is missing or stale."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tg_kernels

PACKAGE_DIR = Path(tg_kernels.__file__).parent
REPO_TESTS = Path(__file__).parent
KERNEL_OPS = ["channel_gate_forward_kernel", "channel_gate_backward_kernel"]


def test_build_info_has_the_documented_keys():
    info = tg_kernels.build_info()
    for key in (
        "version",
        "torch_version",
        "torch_cuda_version",
        "with_cuda",
        "cuda_arch_list",
        "git_revision",
        "extension_loaded",
        "extension_error",
        "runtime_torch_version",
    ):
        assert key in info
    assert info["runtime_torch_version"] == torch.__version__
    assert info["extension_loaded"] == (info["extension_error"] is None)


@pytest.mark.skipif(not tg_kernels.build_info()["extension_loaded"], reason="extension not built")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tg_kernels::{op}", "CPU")


@pytest.mark.skipif(not tg_kernels.build_info()["with_cuda"], reason="extension built without CUDA")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tg_kernels::{op}", "CUDA")
    assert tg_kernels.build_info()["cuda_arch_list"]


def _copy_package(tmp_path: Path, with_extension: bool, build_info: dict | None) -> Path:
    target = tmp_path / "site"
    shutil.copytree(
        PACKAGE_DIR, target / "tg_kernels", ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.json")
    )
    if with_extension:
        for so in PACKAGE_DIR.glob("_C*.so"):
            shutil.copy(so, target / "tg_kernels" / so.name)
    if build_info is not None:
        (target / "tg_kernels" / "_build_info.json").write_text(json.dumps(build_info))
    return target


CHECK_FALLBACK = textwrap.dedent(
    """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import tg_kernels
    messages = [str(w.message) for w in caught if "tg_kernels" in str(w.message)]
    assert len(messages) == 1, messages
    print(messages[0])
    assert tg_kernels.__file__.startswith({site!r}), tg_kernels.__file__
    backends = tg_kernels.available_backends()
    assert backends["torch"].available and not backends["cpp"].available and not backends["cuda"].available
    assert not tg_kernels.build_info()["extension_loaded"]
    """
)


def _run_fallback(site: Path, pytest_args: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"}
    script = CHECK_FALLBACK.format(site=str(site))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=site, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode == 0 and pytest_args:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
            cwd=site,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return tests
    return result


@pytest.mark.slow
def test_missing_extension_warns_once_and_pure_pytorch_tests_pass(tmp_path):
    site = _copy_package(tmp_path, with_extension=False, build_info=None)
    for name in ("conftest.py", "helpers.py", "test_gate.py", "test_channel_gate.py"):
        shutil.copy(REPO_TESTS / name, site / name)
    result = _run_fallback(site, ["test_gate.py", "test_channel_gate.py", "-k", "torch-cpu or not cpu"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_missing_extension_warning_says_why(tmp_path):
    site = _copy_package(tmp_path, with_extension=False, build_info=None)
    result = _run_fallback(site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not built" in result.stdout


@pytest.mark.skipif(not tg_kernels.build_info()["extension_loaded"], reason="extension not built")
def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    site = _copy_package(tmp_path, with_extension=True, build_info={"torch_version": "1.0.0", "with_cuda": False})
    result = _run_fallback(site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built for torch 1.0.0" in result.stdout


def test_broken_extension_file_is_reported_not_raised(tmp_path):
    site = _copy_package(tmp_path, with_extension=False, build_info=None)
    (site / "tg_kernels" / "_C.abi3.so").write_bytes(b"not a shared library")
    result = _run_fallback(site)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "importing the extension failed" in result.stdout
