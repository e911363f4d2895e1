"""``bitalloc::quant_matmul``: dispatch to each Triton path vs QuantLinear's torch reference,
torch.library registration (opcheck, fake tensors, torch.compile), bad input, the per-GPU
config cache, and the GPU benchmark script's CPU-reachable code.

Triton paths run on the interpreter (backend="triton"). Bound: float32 max |y - ref| <=
1e-5 · ||ref||_inf against ``QuantLinear._forward_reference`` (observed <= ~6e-7).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bitalloc.kernels import ops
from bitalloc.kernels.formats import parse_scheme
from bitalloc.kernels.qlinear import QuantLinear
from bitalloc.kernels.quant import quantize_weight

ROOT = Path(__file__).resolve().parents[2]
IN, OUT = 320, 48
BOUND = 1e-5

# (scheme, M, expected path): every path, splits with int / fp16 high parts, float codes, A8 fallbacks
DISPATCH = [
    ("w4g128", 1, "gemv"),
    ("w3g64z+h8r0.05", 5, "gemv"),
    ("w2g32z+h8r0.05", 24, "gemm"),
    ("w4g128+h16r0.1", 12, "gemm"),
    ("w5g256z+h6r0.1", 136, "dense"),  # 320 = 256 + 64: partial group; dense dequant of both parts
    ("fp8g128", 3, "gemv"),
    ("w8a8", 3, "a8"),
    ("w8a8", 40, "a8"),
    ("w4g128af8", 16, "a8"),
    ("w6g64za8+h8r0.02", 8, "a8"),  # int8 dot low, wide dot for the asymmetric 8-bit high part
    ("fp4g32a8", 6, "gemv"),  # A8 on float codes: fake-quantized activations, A16 kernel
    ("w4g128af8+h16r0.1", 20, "gemm"),
    ("fp16", 4, "matmul"),
]


def _layer(name: str, bias: bool = True, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(IN, OUT, bias=bias), name)


def _rel(y, ref) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name,M,path", DISPATCH, ids=[f"{n}-M{m}" for n, m, _ in DISPATCH])
def test_triton_dispatch_matches_quantlinear_reference(name, M, path):
    ql = _layer(name)
    s = ql.scheme
    assert ops.select_kernel(M, s.act, s.weight, s.high) == path
    x = torch.randn(1, M, IN)  # leading dims are flattened
    ref = ql._forward_reference(x)
    y = ops.quant_linear(x, ql.quantized_weight(), ql.bias, backend="triton")
    assert y.shape == ref.shape == (1, M, OUT) and y.dtype == ref.dtype
    assert _rel(y, ref) <= BOUND


def test_reference_backend_is_exactly_quantlinear():
    ql = _layer("w3g64z+h8r0.05")
    x = torch.randn(2, 3, IN)
    assert torch.equal(ops.quant_linear(x, ql.quantized_weight(), ql.bias), ql._forward_reference(x))


def test_empty_batch():
    ql = _layer("w4g128")
    y = ops.quant_linear(torch.randn(0, IN), ql.quantized_weight(), ql.bias, backend="triton")
    assert y.shape == (0, OUT)


def test_auto_backend_cpu_uses_reference_unless_forced(monkeypatch):
    ql = _layer("w4g128")
    calls = []
    real = ops._triton_matmul
    monkeypatch.setattr(ops, "_triton_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, IN)
    monkeypatch.delenv("BITALLOC_FORCE_TRITON", raising=False)
    assert torch.equal(ops.quant_linear(x, ql.quantized_weight(), ql.bias), ql._forward_reference(x))
    assert calls == []
    monkeypatch.setenv("BITALLOC_FORCE_TRITON", "1")
    y = ops.quant_linear(x, ql.quantized_weight(), ql.bias)
    assert calls == [1] and _rel(y, ql._forward_reference(x)) <= BOUND


def test_quant_matmul_flat_arguments():
    """The flat entry point with a HighPart equals the QuantizedWeight convenience."""
    qw = quantize_weight(torch.randn(OUT, IN), parse_scheme("w3g64z+h8r0.05"))
    h = ops.HighPart(qw.high.qweight, qw.high.scales, qw.high.qzeros, qw.high_idx, 8, 64, False)
    x = torch.randn(4, IN)
    y = ops.quant_matmul(x, qw.low.qweight, qw.low.scales, qw.low.qzeros, bits=3, group_size=64,
                         symmetric=False, high=h, backend="triton")
    assert _rel(y, ops.quant_linear(x, qw, backend="reference")) <= BOUND


# -- torch.library registration ---------------------------------------------------------
def _op_args(name="w3g64z+h8r0.05", M=3, backend="reference"):
    ql = _layer(name)
    s = ql.scheme
    h = s.high
    return (
        torch.randn(M, IN), ql.qweight, ql.scales, ql.qzeros, ql.bias,
        ql.high_qweight, ql.high_scales, ql.high_qzeros, ql.high_idx,
        s.weight.kind, s.weight.bits, s.weight.group_size or 0, s.weight.symmetric,
        h.kind if h else "int", h.bits if h else 0, (h.group_size or 0) if h else 0, h.symmetric if h else True,
        IN, s.act, backend,
    )


def test_opcheck_reference():
    torch.library.opcheck(torch.ops.bitalloc.quant_matmul.default, _op_args())


def test_opcheck_triton_interpreter():
    torch.library.opcheck(
        torch.ops.bitalloc.quant_matmul.default, _op_args("w8a8", M=2, backend="triton"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_fake_tensor_tracing_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args("w4g128+h16r0.1", backend="auto")
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    fake[0] = mode.from_tensor(torch.empty(7, IN, dtype=torch.bfloat16))
    with mode:
        y = torch.ops.bitalloc.quant_matmul(*fake)
        assert y.shape == (7, OUT) and y.dtype == torch.bfloat16
        fake[0] = mode.from_tensor(torch.empty(7, IN + 1))
        with pytest.raises(ValueError, match="input features"):  # the fake impl validates too
            torch.ops.bitalloc.quant_matmul(*fake)


def test_torch_compile_fullgraph():
    ql = _layer("w4g128")
    qw, b = ql.quantized_weight(), ql.bias

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def f(x):
        return ops.quant_linear(x, qw, b) * 2

    x = torch.randn(3, IN)
    assert torch.allclose(f(x), 2 * ql._forward_reference(x), atol=1e-6)


# -- bad input ------------------------------------------------------------------------------
def _bad(args, i, value):
    a = list(args)
    a[i] = value
    return a


@pytest.mark.parametrize(
    "i,value,match",
    [
        (0, torch.ones(3, IN, dtype=torch.int32), "dtype"),
        (0, torch.randn(3, IN, dtype=torch.float64), "dtype"),
        (0, torch.randn(3, IN - 1), "input features"),
        (0, torch.randn(3, IN, device="meta"), "is on cpu"),
        (1, torch.zeros(OUT, 7, dtype=torch.int32), "qweight"),  # packed words do not match
        (2, torch.zeros(OUT, 5, dtype=torch.float32), "scales"),
        (3, None, "qzeros"),  # asymmetric needs zero-points
        (4, torch.zeros(OUT + 1), "bias"),
        (8, torch.arange(3, dtype=torch.int16), "qweight|scales"),  # high count differs from packed high part
        (8, torch.arange(16, dtype=torch.int64).float(), "high_idx"),
        (9, "int4", "kind"),
        (10, 7, "bits"),
        (11, 100, "group_size"),
        (18, "a4", "act"),
        (19, "cuda-graphs", "backend"),
    ],
)
def test_op_rejects_bad_input(i, value, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.bitalloc.quant_matmul(*_bad(_op_args(), i, value))


def test_op_rejects_bad_high_indices_on_cpu():
    args = _op_args()
    k = args[8].numel()
    with pytest.raises(ValueError, match="distinct channels"):
        torch.ops.bitalloc.quant_matmul(*_bad(args, 8, torch.full((k,), IN, dtype=torch.int16)))
    with pytest.raises(ValueError, match="distinct channels"):
        torch.ops.bitalloc.quant_matmul(*_bad(args, 8, torch.zeros(k, dtype=torch.int16)))
    with pytest.raises(ValueError, match="together"):
        torch.ops.bitalloc.quant_matmul(*_bad(args, 5, None))


def test_act_needs_quantized_weight():
    with pytest.raises(ValueError, match="quantized weight"):
        torch.ops.bitalloc.quant_matmul(*_bad(_op_args("fp16"), 18, "a8"))


# -- configs: fixed under the interpreter, tuned + cached per GPU -------------------------------
def test_tuned_config_cache(tmp_path):
    from bitalloc.kernels import triton_common as tc

    path = tmp_path / "cfg.json"
    times = {32: 3.0, 64: 1.0, 128: 2.0}
    runs = []

    def run(cfg):
        if cfg["BLOCK_N"] == 256:
            raise RuntimeError("out of resources")  # skipped, not fatal
        runs.append(cfg["BLOCK_N"])

    def bench(fn):
        fn()
        return times[runs[-1]]

    cands = lambda: [{"BLOCK_N": n} for n in (32, 64, 128, 256)]  # noqa: E731
    default = {"BLOCK_N": 16}
    assert tc.tuned_config("gemv", "k1", path, default, cands, run, bench, tune=False) == default
    assert not path.exists()
    assert tc.tuned_config("gemv", "k1", path, default, cands, run, bench, tune=True) == {"BLOCK_N": 64}
    assert json.loads(path.read_text()) == {"gemv": {"k1": {"BLOCK_N": 64}}}
    n = len(runs)
    assert tc.tuned_config("gemv", "k1", path, default, cands, run, bench, tune=True) == {"BLOCK_N": 64}
    assert len(runs) == n  # served from the cache
    tc._CACHE.clear()  # a new process reads the file
    assert tc.tuned_config("gemv", "k1", path, default, cands, run, bench, tune=False) == {"BLOCK_N": 64}
    assert tc.pick_config("gemv", "k1", torch.device("cpu"), default, {"BLOCK_N": 8}, cands, run) == {"BLOCK_N": 8}


def test_cache_path_is_per_gpu(monkeypatch, tmp_path):
    from bitalloc.kernels import triton_common as tc

    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path))
    p = tc.cache_path(torch.device("cpu"))
    assert p.parent == tmp_path and "cpu" in p.name and p.suffix == ".json"


# -- the GPU benchmark script ------------------------------------------------------------------
def test_bench_script_without_gpu_says_so():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_kernels.py")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "no CUDA GPU", r.stderr


def test_bench_case_runs_on_cpu_interpreter():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_kernels as bk
    finally:
        sys.path.pop(0)
    timer = lambda fn: (fn(), 1.0)[1]  # noqa: E731  one call, fake 1 ms
    rows = [bk.bench_case(s, 40, 256, m, torch.device("cpu"), timer=timer, l2_bytes=8 << 10, copy_gbps=10.0,
                          backend="triton") for s, m in (("w4g128", 1), ("w8a8", 16))]
    assert [r["kernel"] for r in rows] == ["gemv", "a8"]
    assert rows[0]["rotated_copies"] > 1 and rows[0]["GBps"] > 0 and rows[0]["gemlite_ms"] is None
    table = bk.format_table(rows)
    assert "w4g128" in table and "w8a8" in table
