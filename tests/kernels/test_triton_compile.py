"""The kernels compile for real NVIDIA GPUs (PTX and cubin through ptxas), without a GPU.

The interpreter runs kernels as numpy code and so cannot catch what only the compiler
rejects (dtype casts such as int32 -> fp8, dot operand types, layouts). This test calls
the real launchers with CPU tensors in a subprocess *without* TRITON_INTERPRET (so every
launch-time decision is the GPU one: fp16/bf16 tensor-core dots, fp16 "wide" A8 dots,
fp8 token codes), records the arguments each launcher passes instead of launching, and
compiles each kernel ahead of time for sm_90 (H100), and the int8 A8 kernel for sm_80 (A100).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitalloc.kernels import triton_a8, triton_dequant, triton_gemm, triton_gemv
from bitalloc.kernels.formats import Format
from bitalloc.kernels.quant import quantize
from bitalloc.kernels.triton_common import Segment

calls = []

class Recorder:
    """Stands in for kernel[grid](...): records (kernel, args, kwargs) instead of launching."""
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

for mod, name in ((triton_gemv, "_gemv_kernel"), (triton_gemm, "_gemm_kernel"),
                  (triton_a8, "_a8_kernel"), (triton_dequant, "_dequant_kernel")):
    setattr(mod, name, Recorder(getattr(mod, name)))

def seg(fmt, n=64, k=320):
    return Segment.from_quantized(quantize(torch.randn(n, k), fmt))

lo3 = seg(Format("int", 3, 64, False), k=300)
hi8 = seg(Format("int", 8, 64, False), k=20)
lo5 = seg(Format("int", 5, 256, True))
h16 = seg(Format("fp16", 16, None))
w8 = seg(Format("int", 8, None, True))
w4 = seg(Format("int", 4, 128, True))
w8z = seg(Format("int", 8, 64, False))
fp8w = seg(Format("fp8_e4m3", 8, 128, True))
fp4w = seg(Format("fp4_e2m1", 4, 32, True))

triton_gemv._launch(torch.randn(8, 320, dtype=torch.float16), lo3, hi8, dict(triton_gemv._default(8), SPLIT_K=2))
triton_gemm._launch(torch.randn(32, 640, dtype=torch.bfloat16), lo5, h16, triton_gemm.DEFAULT,
                    torch.empty(32, 64, dtype=torch.bfloat16))
triton_gemm._launch(torch.randn(16, 320), fp8w, None, triton_gemm.DEFAULT, torch.empty(16, 64))
q8, s8 = triton_a8.quantize_tokens(torch.randn(16, 320), "a8")
triton_a8._launch(q8, s8, w8, None, "a8", triton_a8.DEFAULT, torch.empty(16, 64, dtype=torch.float16))
qf, sf = triton_a8.quantize_tokens(torch.randn(16, 320), "af8", fp8_dtype=True)
triton_a8._launch(qf, sf, w4, None, "af8", triton_a8.DEFAULT, torch.empty(16, 64, dtype=torch.float16))
q16, s16 = triton_a8.quantize_tokens(torch.randn(16, 320), "af8", fp8_dtype=False)
triton_a8._launch(q16, s16, w8z, None, "af8", triton_a8.DEFAULT, torch.empty(16, 64, dtype=torch.bfloat16))
triton_dequant._launch(fp4w, torch.empty(64, 320, dtype=torch.float16), triton_dequant.DEFAULT)

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}

def compile_one(fn, args, kwargs, arch):
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    consts = {k: v for k, v in kwargs.items() if k not in opts}
    runtime = [n for n in fn.arg_names if n not in consts]
    assert len(runtime) == len(args), (fn.__name__, runtime, len(args))
    sig = {n: "constexpr" for n in consts}
    for n, a in zip(runtime, args):
        sig[n] = "*" + TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32"
    sig = {n: sig[n] for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=opts)
    assert "cubin" in k.asm, sorted(k.asm)

assert len(calls) == 7, len(calls)
for i, (fn, args, kwargs) in enumerate(calls):
    for arch in ((90, 80) if i == 3 else (90,)):  # sm_80 (A100) once: the int8 tensor-core A8 kernel
        compile_one(fn, args, kwargs, arch)
        print(fn.__name__, f"sm_{arch}", "ok", flush=True)
'''


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend (ptxas) to compile with")
def test_kernels_compile_for_nvidia_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    lines = r.stdout.split()
    assert r.stdout.count(" ok") == 8, r.stdout
    assert "_a8_kernel" in lines and "_gemv_kernel" in lines and "_dequant_kernel" in lines
