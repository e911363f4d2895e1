"""End-to-end decode throughput of a mixed-precision plan against fp16, on a CUDA GPU.

A random-weight Llama with Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 layers,
32 heads, vocab 32000; random weights: speed only, never quality) is built in float16.
Each plan is materialised with ``allocator.executor.apply`` (packed ``QuantLinear`` layers
calling the Triton kernels); ``fp16`` is the model itself (cuBLAS). Decoding runs one token
per sequence per step through a static KV cache:

* the decode step (embedding, rotary, attention over the static cache, MLP, lm_head and
  greedy next token, position += 1) touches only static tensors and never syncs the host,
  so it is captured once as a CUDA graph (``torch.cuda.CUDAGraph``) and replayed;
* the step is first checked against the transformers forward of the same model (logits of
  a short prompt decoded token by token), so the numbers are for a correct decoder;
* tokens/second = batch x steps / time of ``steps`` replays (median of ``--repeats``),
  starting at position ``--context`` (the cache holds ``--context`` earlier positions).

Eager (no graph) timings are reported too: at batch 1 the launch overhead dominates.

    python experiments/bench_e2e.py [--batches 1,16] [--steps 128] [--out experiments/results/bench_e2e.json]
    python experiments/bench_e2e.py --cpu-smoke     # tiny config (2 layers, hidden 256), CPU, no graphs

Without a CUDA GPU (and without --cpu-smoke) it prints "no CUDA GPU" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
SMOKE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
DEFAULT_OUT = ROOT / "experiments" / "results" / "bench_e2e.json"
SMOKE_OUT = ROOT / "experiments" / "results" / "bench_e2e_cpu_smoke.json"

# the mixed plan (~3.6 bpw on 7B shapes): by role; down_proj of the first and last block in w8a8,
# gate_proj of every 4th block (1, 5, 9, ...) 2-bit with 5% high-impact channels in 4-bit
ROLE_SCHEMES = {"q_proj": "w3g64z", "k_proj": "w3g64z", "v_proj": "w4g128", "o_proj": "w4g128",
                "gate_proj": "w3g64z", "up_proj": "w3g64z", "down_proj": "w4g128z"}
EDGE_SCHEME = "w8a8"
SPLIT_SCHEME = "w2g64z+h4r0.05"

COLUMNS = (("plan", "plan", ""), ("bpw", "bpw", ".2f"), ("weight_MB", "weights MB", ".1f"), ("batch", "batch", ""),
           ("mode", "mode", ""), ("tokens_per_s", "tok/s", ".1f"), ("ms_per_step", "ms/step", ".2f"),
           ("speedup", "vs fp16", ".2f"), ("check", "check err", ".1e"))


# ---------------------------------------------------------------------------------------
# model and plans


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM in ``dtype`` on ``device`` (speed only)."""
    import transformers as tf

    cfg = tf.LlamaConfig(**config, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def mixed_scheme(fqn: str, n_layers: int) -> str:
    parts = fqn.split(".")
    block, role = int(parts[2]), parts[-1]
    if role == "down_proj" and block in (0, n_layers - 1):
        return EDGE_SCHEME
    if role == "gate_proj" and block % 4 == 1:
        return SPLIT_SCHEME
    return ROLE_SCHEMES[role]


def make_plan(model, name: str):
    """'mixed' (see ROLE_SCHEMES) or a scheme name for a uniform plan, over every block linear (not lm_head)."""
    from bitalloc.allocator.plan import LayerPlan, Plan
    from bitalloc.kernels.formats import parse_scheme

    n_layers = model.config.num_hidden_layers
    layers = {}
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."):
            scheme = parse_scheme(mixed_scheme(fqn, n_layers) if name == "mixed" else name)
            shape = (m.out_features, m.in_features)
            layers[fqn] = LayerPlan(fqn, scheme.name, shape, scheme.storage_bits(*shape))
    return Plan(model={"spec": "random:llama-bench", "architecture": type(model).__name__}, layers=layers, label=name)


def model_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer, each shared tensor once (packed layers: packed bytes)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def linear_bytes(model) -> tuple[int, int]:
    """(bytes, weights) of the block linears: packed QuantLinear buffers or the dense weight."""
    from bitalloc.kernels.qlinear import QuantLinear

    nbytes = n = 0
    for fqn, m in model.named_modules():
        if fqn.startswith("model.layers.") and isinstance(m, (QuantLinear, torch.nn.Linear)):
            nbytes += m.weight_nbytes() if isinstance(m, QuantLinear) else m.weight.numel() * 2
            n += m.in_features * m.out_features
    return nbytes, n


# ---------------------------------------------------------------------------------------
# the decode step


class Decoder:
    """One decode step for a Llama model over a static KV cache; only static tensors, no host sync."""

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device, self.dtype = p.device, p.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        shape = (batch, self.n_kv, max_len, self.head_dim)
        n = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # input of the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # its position
        self.arange = torch.arange(max_len, device=self.device)

    def reset(self, pos: int = 0, tokens: torch.Tensor | None = None) -> None:
        self.pos.fill_(pos)
        if tokens is None:
            self.tokens.fill_(1)
        else:
            self.tokens.copy_(tokens)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode self.tokens at self.pos: logits (B, V); self.tokens <- greedy next token, self.pos += 1."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        B, H, KV, hd = self.batch, self.n_heads, self.n_kv, self.head_dim
        h = m.embed_tokens(self.tokens)  # (B, 1, D)
        cos, sin = m.rotary_emb(h, self.pos.view(1, 1).expand(B, 1))  # (B, 1, hd)
        mask = (self.arange <= self.pos).view(1, 1, 1, self.max_len)  # attend to positions 0..pos
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd)
            k = a.k_proj(x).view(B, 1, KV, hd).transpose(1, 2)  # (B, KV, 1, hd)
            v = a.v_proj(x).view(B, 1, KV, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k_cache[i].index_copy_(2, self.pos, k)
            self.v_cache[i].index_copy_(2, self.pos, v)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if KV != H:
                kc, vc = kc.repeat_interleave(H // KV, dim=1), vc.repeat_interleave(H // KV, dim=1)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)  # (B, H, 1, hd)
            h = h + a.o_proj(o.transpose(1, 2).reshape(B, 1, H * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(m.norm(h))[:, 0]  # (B, V)
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits


@torch.no_grad()
def check_decoder(model, prompt_len: int = 8, batch: int = 2, seed: int = 1) -> float:
    """max |decode-step logits - transformers forward logits| / max |forward logits| over a short prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(next(model.parameters()).device)
    ref = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
    dec = Decoder(model, batch, prompt_len)
    out = []
    for t in range(prompt_len):
        dec.reset(t, ids[:, t : t + 1])
        out.append(dec.step().float())
    got = torch.stack(out, 1)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model, batch: int, steps: int, context: int, graph: bool, repeats: int, warmup: int = 3) -> dict:
    """Tokens/second of ``steps`` decode steps (median over repeats); graph: CUDA-graph replay."""
    device = next(model.parameters()).device
    dec = Decoder(model, batch, context + 2 * warmup + steps + 2)
    fn = dec.step
    g = None
    if graph:
        dec.reset(context)
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):  # warm up (Triton compiles, autotune) outside the capture
            for _ in range(warmup):
                dec.step()
        torch.cuda.current_stream(device).wait_stream(s)
        _sync(device)
        g = torch.cuda.CUDAGraph()
        dec.reset(context)
        with torch.cuda.graph(g):
            dec.step()
        fn = g.replay
    times = []
    for _ in range(repeats):
        dec.reset(context)
        for _ in range(warmup):
            fn()
        dec.reset(context)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    del g, dec
    return {"tokens_per_s": batch * steps / sec, "ms_per_step": 1e3 * sec / steps}


# ---------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU, no CUDA graphs (checks the code paths)")
    ap.add_argument("--plans", default="mixed,w4g128", help="comma list: 'mixed' and/or scheme names (fp16 is always run)")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,16; smoke 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 128; smoke 4)")
    ap.add_argument("--context", type=int, default=None, help="position decoding starts at (default 512; smoke 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats, median taken (default 5; smoke 1)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (no graph) timings on CUDA")
    ap.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; smoke "
                                                f"{SMOKE_OUT.relative_to(ROOT)})")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA GPU")
        return 0
    from bitalloc.allocator.executor import apply
    from bitalloc.allocator.report import format_table

    device = torch.device("cpu") if smoke else torch.device("cuda")
    dtype = torch.float32 if smoke else torch.float16  # CPU: the reference path, float32
    config = SMOKE if smoke else LLAMA2_7B
    batches = [int(b) for b in (a.batches or ("1,2" if smoke else "1,16")).split(",")]
    steps = a.steps or (4 if smoke else 128)
    context = a.context if a.context is not None else (8 if smoke else 512)
    repeats = a.repeats or (1 if smoke else 5)
    modes = ["eager"] if smoke else (["cuda-graph"] if a.no_eager else ["cuda-graph", "eager"])
    # decode step vs transformers forward: float rounding, plus int8 activation rounding flips (a8 schemes)
    tol = 2e-2 if dtype == torch.float32 else 5e-2
    out_path = Path(a.out) if a.out else (SMOKE_OUT if smoke else DEFAULT_OUT)

    t0 = time.perf_counter()
    base = build_model(config, device, dtype)
    print(f"built random Llama {config} in {dtype} on {device} ({time.perf_counter() - t0:.1f}s)", flush=True)
    models = {"fp16": (base, None)}
    for name in [p.strip() for p in a.plans.split(",") if p.strip() and p.strip() != "fp16"]:
        t0 = time.perf_counter()
        plan = make_plan(base, name)
        models[name] = (apply(base, plan), plan)
        print(f"applied plan {name} ({plan.bpw:.3f} bpw, {plan.scheme_counts()}) in {time.perf_counter() - t0:.1f}s",
              flush=True)

    rows, errors = [], []
    fp16_tps: dict = {}
    for name, (model, plan) in models.items():
        err = check_decoder(model)
        if not math.isfinite(err) or err > tol:
            errors.append(f"{name}: decode step differs from the transformers forward (rel. err {err:.2e} > {tol:.0e})")
        lb, n = linear_bytes(model)
        info = {"plan": name, "bpw": 8 * lb / n, "weight_MB": model_bytes(model) / 1e6, "check": err}
        for batch in batches:
            for mode in modes:
                r = dict(info, batch=batch, mode=mode)
                try:
                    r.update(time_decode(model, batch, steps, context, mode == "cuda-graph", repeats))
                except Exception as e:  # noqa: BLE001 - report the failure in the table, keep going
                    r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    errors.append(f"{name} batch {batch} {mode}: {r['error']}")
                if name == "fp16" and "tokens_per_s" in r:
                    fp16_tps[(batch, mode)] = r["tokens_per_s"]
                ref = fp16_tps.get((batch, mode))
                if ref and "tokens_per_s" in r:
                    r["speedup"] = r["tokens_per_s"] / ref
                rows.append(r)
                print(f"  {name} batch {batch} {mode}: {r.get('tokens_per_s', float('nan')):.1f} tok/s", flush=True)
        if plan is not None:
            del model
            models[name] = (None, plan)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    table = format_table(rows, COLUMNS)
    print()
    print(table)
    result = {
        "benchmark": "bench_e2e",
        "smoke": smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "config": config,
        "steps": steps,
        "context": context,
        "repeats": repeats,
        "plans": {k: ({"bpw": p.bpw, "schemes": p.scheme_counts()} if p is not None else {"bpw": 16.0})
                  for k, (_, p) in models.items()},
        "rows": rows,
        "errors": errors,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"\nresults: {out_path}")
    if errors:
        print("errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
