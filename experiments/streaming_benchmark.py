"""Block streaming (issue 17): profile a model whose 16-bit weights are larger than the
memory limit, and check the streamed profile equals the in-memory one where both fit.

Random-weight Llama configs (plumbing, not quality), written once as bfloat16 safetensors
directories under ``--work`` (no tokenizer: bitalloc's byte-level fallback):

* ``tinyllama-1b``: TinyLlama-1.1B's shape (hidden 2048, 22 blocks, intermediate 5632,
  GQA 32/4, 32k vocabulary) with tied embeddings, so the LM head is skipped as SmolLM2's is:
  1.03 B parameters, 2.07 GB of 16-bit weights, 4.1 GB at float32 where it is profiled.
* ``small``: the same family at hidden 512, 8 blocks, intermediate 1376: 42 M parameters.
* ``smollm2``: the real SmolLM2-135M, streamed from the package's GGUF (tensors dequantized
  one at a time), against the whole model.

Every run is ``bitalloc profile`` in a child process under ``/usr/bin/time -v`` (its peak
RSS: the driver's), with the calibrated-proxy settings: WikiText-2 validation text (this repository's
README when the shared data is missing), ``--n-samples 4 --seq-len 128 --kl-samples 1
--kl-stride 2``, schemes ``w2g64z,w3g128z,w4g128z,fp16``, reference ``w3g128z``.

    python experiments/streaming_benchmark.py                       # all rows, ~20 min here
    python experiments/streaming_benchmark.py --rows small          # the equality check only
    python experiments/streaming_benchmark.py --rows small-ray,tinyllama-1b-ray   # on 2 local Ray workers
    python experiments/streaming_benchmark.py --kind default --rows small,tinyllama-1b   # hybrid refs + Fisher tables

A ``-ray`` row runs ``--workers 2``: each worker reads the model under the same
``--max-memory`` (per worker); its peak RSS comes from the profile's ``metadata.ray``
(each worker's ``getrusage``), the driver's from ``time -v``. Its profile is compared with the
in-process streamed one at the same limit run with one thread (``-1thread`` rows,
``OMP_NUM_THREADS=1``), as each worker runs: float32 products round by thread count, which
moves KL values at the float32 noise floor (about 1e-7 on random weights) by tens of percent.

Results: ``experiments/results/streaming/results.json`` (rows, settings, equality checks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "streaming"

# name: (hidden, intermediate, blocks, heads, kv heads, vocab)
CONFIGS = {
    "tinyllama-1b": (2048, 5632, 22, 32, 4, 32000),
    "small": (512, 1376, 8, 8, 2, 32000),
}
# row: (config, max_memory or None for the whole-model profile, Ray workers (0: in-process),
# torch threads (0: the default))
ROWS = {
    "smollm2": [("smollm2", None, 0, 0), ("smollm2", "1.5GiB", 0, 0)],  # real weights, from the package GGUF
    "small": [("small", None, 0, 0), ("small", "1GiB", 0, 0)],
    "tinyllama-1b": [("tinyllama-1b", "1.5GiB", 0, 0)],
    "tinyllama-1b-whole": [("tinyllama-1b", None, 0, 0)],
    "small-ray": [("small", "1GiB", 0, 1), ("small", "1GiB", 2, 0)],
    "smollm2-ray": [("smollm2", "1.5GiB", 0, 1), ("smollm2", "1.5GiB", 2, 0)],
    "tinyllama-1b-ray": [("tinyllama-1b", "1.5GiB", 2, 0)],
}
SETTINGS = ["--n-samples", "4", "--seq-len", "128", "--kl-samples", "1", "--kl-stride", "2",
            "--schemes", "w2g64z,w3g128z,w4g128z,fp16", "--ref-schemes", "w3g128z"]
# --kind default: the default kind of profile (what `bitalloc run` profiles on a text file):
# hybrid references and both Fisher tables, so the streamed output-Fisher pass runs too
KINDS = {"calibrated-proxy": [], "default": ["--ref-method", "hybrid", "--fisher-table", "--fisher-labels", "both"]}


def make_model(name: str, work: Path) -> Path | str:
    """The config's directory (written once: seeded random weights, bfloat16 safetensors);
    ``smollm2`` is the installed model itself."""
    if name == "smollm2":
        return "smollm2"
    path = work / name
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers as tf

    hidden, inter, blocks, heads, kv, vocab = CONFIGS[name]
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
    tmp.rename(path)
    return path


def calib_text() -> Path:
    from _data import DATA  # beside this script (its folder is on sys.path when run)

    f = DATA / "wikitext2-valid.txt"
    return f if f.is_file() else HERE.parent / "README.md"


def profile(model: Path, max_memory: str | None, out: Path, calib: Path, workers: int = 0, threads: int = 0,
            kind: str = "calibrated-proxy") -> dict:
    cmd = [sys.executable, "-m", "bitalloc.allocator.cli", "--quiet", "profile", "--model", str(model),
           "--calib", str(calib), *SETTINGS, *KINDS[kind], "--out", str(out), "--overwrite"]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    if workers:
        cmd += ["--workers", str(workers)]
    for f in out.parent.glob(f"{out.stem}.measure-checkpoint*"):  # a fresh run: streamed items resume from these
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    meta = json.loads(out.read_text())["metadata"]
    row = {"wall_s": round(wall, 1), "peak_rss_mib": round(rss_kb / 1024, 1), "phases_s": meta.get("wall_s"),
           "streaming": meta.get("streaming"), "command": " ".join(cmd[2:])}
    if workers:  # each worker's own peak (getrusage in the worker), per step
        row["workers"] = workers
        row["worker_peak_rss_mib"] = {step: [w["peak_rss_mb"] for w in info.get("worker_info", [])]
                                      for step, info in meta["ray"].items()}
        row["worker_estimated_peak_mib"] = {step: [round(w["streaming"]["estimated_peak_bytes"] / 2**20, 1)
                                                   for w in info.get("worker_info", [])]
                                            for step, info in meta["ray"].items()}
    return row


def weights_bytes(model: Path | str) -> int:
    """Bytes of the 16-bit weights (SmolLM2: its parameter count x 2; the GGUF holds Q4_1)."""
    if model == "smollm2":
        return 134_515_008 * 2
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def same_profile(a: Path, b: Path) -> dict:
    """Whether two saved profiles hold the same model, proxy, references and table, bit for
    bit, and the largest relative difference of each where they are not."""
    import numpy as np

    import bitalloc

    pa, pb = bitalloc.load_profile(a), bitalloc.load_profile(b)
    out = {"fingerprint": pa.model["fingerprint"]["sha256"] == pb.model["fingerprint"]["sha256"]}
    pairs = [("proxy", pa.proxy, pb.proxy), ("ref_values", pa.ref_values, pb.ref_values),
             ("table", pa.tables["all"], pb.tables["all"])]
    pairs += [(k, getattr(pa, k), getattr(pb, k)) for k in ("fisher", "fisher_text") if getattr(pa, k) is not None]
    for k, x, y in pairs:
        out[k] = bool(np.array_equal(x, y, equal_nan=True))
        if not out[k]:
            ok = np.isfinite(x) & np.isfinite(y) & (np.abs(x) > 0)
            out[f"{k}_max_rel_diff"] = float(np.max(np.abs(x[ok] - y[ok]) / np.abs(x[ok]))) if ok.any() else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="small,tinyllama-1b", help=f"comma list of {sorted(ROWS)}")
    ap.add_argument("--work", default="/tmp/bitalloc-streaming", help="model directories and profiles")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--kind", choices=sorted(KINDS), default="calibrated-proxy",
                    help="default: hybrid references and both Fisher tables (the streamed Fisher pass); rows tagged +default")
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {"rows": {}}
    calib = calib_text()
    for key in a.rows.split(","):
        for name, mm, workers, threads in ROWS[key]:
            model = make_model(name, work)
            tag = (f"{name}@{mm or 'whole'}" + (f"-{workers}workers" if workers else "")
                   + (f"-{threads}thread" if threads else "") + ("+default" if a.kind == "default" else ""))
            print(f"{tag}: profiling ...", flush=True)
            row = profile(model, mm, work / f"{tag}.json", calib, workers, threads, a.kind)
            row.update(threads=threads or None, kind=a.kind)
            row.update(config=name, max_memory=mm, params_16bit_bytes=weights_bytes(model))
            results["rows"][tag] = row
            print(f"{tag}: {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
    checks = {}
    for name in [*CONFIGS, "smollm2"]:
        for sfx in ("", "+default"):
            whole = work / f"{name}@whole{sfx}.json"
            for streamed in sorted(work.glob(f"{name}@*iB{sfx}.json")):
                if whole.is_file():
                    checks[streamed.stem] = same_profile(whole, streamed)
            for ray in sorted(work.glob(f"{name}@*workers{sfx}.json")):  # against in-process streaming, 1 thread
                stem = ray.stem.removesuffix(sfx).rsplit("-", 1)[0]  # name@limit
                local = ray.with_name(f"{stem}-1thread{sfx}.json")
                if local.is_file():
                    checks[ray.stem] = {"against": local.stem, **same_profile(local, ray)}
    # checks of earlier runs (their profiles may be gone from --work) stay; rows carry their kind
    results.update(settings=SETTINGS, kinds=KINDS, calibration=str(calib), checks={**results.get("checks", {}), **checks},
                   machine="2-core CPU, 24 GiB (the development machine)",
                   date=time.strftime("%Y-%m-%d"))
    res_file.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| run | 16-bit weights | max_memory | wall | peak RSS (driver) | peak RSS per worker |\n|---|---|---|---|---|---|")
    for tag, r in results["rows"].items():
        per = (", ".join(f"{step} {max(v)}" for step, v in r["worker_peak_rss_mib"].items() if v) + " MiB"
               if r.get("workers") else "-")
        print(f"| {tag} | {r['params_16bit_bytes'] / 2**30:.2f} GiB | {r['max_memory'] or '-'} | {r['wall_s']} s | "
              f"{r['peak_rss_mib']} MiB | {per} |")
    for name, c in checks.items():
        print(f"{name}: streamed == whole: {c}")
    print(f"-> {res_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
