"""Register and spill figures of the Triton gated-linear kernels, from ``ptxas -v``, without a GPU.

Compiles each kernel with the launch-time plan of a layer-sized problem for a chosen target
(``sm_80``, ``sm_90``) through Triton's real compiler, then runs ``ptxas -v`` on the PTX and
prints one line per kernel and dtype: registers, spill stores and spill loads (bytes).

    python bench/ptxas_report.py --arch 90 --shape 4096 4096 1024

Run it with TRITON_INTERPRET unset (it is removed here before Triton is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tg_kernels.triton import gated_linear as tgl  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_PTRS = {"gate_ptr", "partial_ptr", "sum_ptr", "gg_ptr"}
I32_PTRS = {"perm_ptr", "n_active_ptr"}


def ptxas_path() -> Path:
    """Triton's bundled ptxas, else the CUDA toolkit's."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return bundled
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "ptxas").exists():
            return Path(root) / "bin" / "ptxas"
    raise FileNotFoundError("no ptxas found (neither Triton's bundled one nor a CUDA toolkit's)")


def compile_ptx(kernel, dtype: str, constexprs: dict, arch: int, scalars: dict | None = None, **options) -> str:
    """PTX of `kernel` for sm_<arch> with the given constexprs, specialised as the JIT does at launch.

    Pointers are 16-byte aligned; an integer argument with a value in `scalars` becomes a constant
    when it is 1 and is marked divisible by 16 when it is, unless the kernel lists it in
    ``do_not_specialize`` (ints without a value: plain i32).
    """
    scalars = scalars or {}
    unspecialised = {kernel.arg_names[a] if isinstance(a, int) else a for a in kernel.do_not_specialize}
    sig, attrs, constexprs = {}, {}, dict(constexprs)
    for idx, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_PTRS else "*i32" if name in I32_PTRS else "*" + dtype
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            value = scalars.get(name)
            sig[name] = "i64" if value is not None and value >= 2**31 else "i32"
            if value is not None and name not in unspecialised:
                if value == 1:
                    sig[name] = "constexpr"
                    constexprs[name] = 1
                elif value % 16 == 0:
                    attrs[(idx,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def ptxas_figures(ptx: str, arch: int) -> dict[str, int]:
    """{"registers", "spill_stores", "spill_loads"} from ``ptxas -v`` on one kernel's PTX."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    sm = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(ptxas_path()), "-v", f"-arch={sm}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
    }


def report(n: int, channels: int, k: int, arch: int) -> list[dict]:
    rows = []
    for name, dtype in DTYPES.items():
        p = tgl.plan(n, channels, k, dtype, interpret=False)
        try:
            dot = tgl._dot_config(dtype, interpret=False)
        except TypeError:  # an older tree (for before/after figures): no interpret argument
            dot = tgl._dot_config(dtype)
        opts = {"num_warps": p.num_warps, "num_stages": p.num_stages}
        scalars = {  # a contiguous grad_y, as autograd usually hands it over
            "N": n,
            "C": channels,
            "K": k,
            "stride_dyn": channels,
            "stride_dyc": 1,
            "m_tiles": -(-n // p.fwd_m),
            "k_tiles": -(-k // p.dw_k),
        }
        kernels = {
            "forward": (
                tgl._forward_kernel,
                {"BLOCK_M": p.fwd_m, "BLOCK_N": p.fwd_n, "BLOCK_K": p.fwd_k, "HAS_BIAS": True, "INT64": p.int64, **dot},
            ),
            "input_grad": (
                tgl._input_grad_kernel,
                {"BLOCK_M": p.dx_m, "BLOCK_K": p.dx_k, "BLOCK_C": p.dx_c, "INT64": p.int64, **dot},
            ),
            "weight_grad_exact": (
                tgl._weight_grad_kernel,
                {"BLOCK_C": p.dw_c, "BLOCK_K": p.dw_k, "BLOCK_N": p.dw_n, "HARD": False, "INT64": p.int64, **dot},
            ),
            "weight_grad_hard": (
                tgl._weight_grad_kernel,
                {"BLOCK_C": p.dw_c, "BLOCK_K": p.dw_k, "BLOCK_N": p.dw_n, "HARD": True, "INT64": p.int64, **dot},
            ),
        }
        for kname, (kernel, constexprs) in kernels.items():
            figures = ptxas_figures(compile_ptx(kernel, name, constexprs, arch, scalars, **opts), arch)
            rows.append({"kernel": kname, "dtype": name, "arch": f"sm_{arch}", **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (80, 90)")
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 4096, 1024], metavar=("N", "C", "K"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = [row for arch in args.arch for row in report(*args.shape, arch)]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'kernel':<18} {'dtype':<5} {'arch':<6} {'regs':>5} {'spill st':>9} {'spill ld':>9}")
    for r in rows:
        print(
            f"{r['kernel']:<18} {r['dtype']:<5} {r['arch']:<6} {r['registers']:>5} "
            f"{r['spill_stores']:>8}B {r['spill_loads']:>8}B"
        )


if __name__ == "__main__":
    main()
