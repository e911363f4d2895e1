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
RSS), with the calibrated-proxy settings: WikiText-2 validation text (this repository's
README when the shared data is missing), ``--n-samples 4 --seq-len 128 --kl-samples 1
--kl-stride 2``, schemes ``w2g64z,w3g128z,w4g128z,fp16``, reference ``w3g128z``.

    python experiments/streaming_benchmark.py                       # all rows, ~20 min here
    python experiments/streaming_benchmark.py --rows small          # the equality check only

Results: ``experiments/results/streaming/results.json`` (rows, settings, equality checks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
# row: (config, max_memory or None for the whole-model profile)
ROWS = {
    "smollm2": [("smollm2", None), ("smollm2", "1.5GiB")],  # real weights, streamed from the package GGUF
    "small": [("small", None), ("small", "1GiB")],
    "tinyllama-1b": [("tinyllama-1b", "1.5GiB")],
    "tinyllama-1b-whole": [("tinyllama-1b", None)],
}
SETTINGS = ["--n-samples", "4", "--seq-len", "128", "--kl-samples", "1", "--kl-stride", "2",
            "--schemes", "w2g64z,w3g128z,w4g128z,fp16", "--ref-schemes", "w3g128z"]


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


def profile(model: Path, max_memory: str | None, out: Path, calib: Path) -> dict:
    cmd = [sys.executable, "-m", "bitalloc.allocator.cli", "--quiet", "profile", "--model", str(model),
           "--calib", str(calib), *SETTINGS, "--out", str(out), "--overwrite"]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    meta = json.loads(out.read_text())["metadata"]
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(rss_kb / 1024, 1), "phases_s": meta.get("wall_s"),
            "streaming": meta.get("streaming"), "command": " ".join(cmd[2:])}


def weights_bytes(model: Path | str) -> int:
    """Bytes of the 16-bit weights (SmolLM2: its parameter count x 2; the GGUF holds Q4_1)."""
    if model == "smollm2":
        return 134_515_008 * 2
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def same_profile(a: Path, b: Path) -> dict:
    """Whether two saved profiles hold the same model, proxy, references and table, bit for bit."""
    import numpy as np

    import bitalloc

    pa, pb = bitalloc.load_profile(a), bitalloc.load_profile(b)
    return {"fingerprint": pa.model["fingerprint"]["sha256"] == pb.model["fingerprint"]["sha256"],
            "proxy": bool(np.array_equal(pa.proxy, pb.proxy)),
            "ref_values": bool(np.array_equal(pa.ref_values, pb.ref_values)),
            "table": bool(np.array_equal(pa.tables["all"], pb.tables["all"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="small,tinyllama-1b", help=f"comma list of {sorted(ROWS)}")
    ap.add_argument("--work", default="/tmp/bitalloc-streaming", help="model directories and profiles")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {"rows": {}}
    calib = calib_text()
    for key in a.rows.split(","):
        for name, mm in ROWS[key]:
            model = make_model(name, work)
            tag = f"{name}@{mm or 'whole'}"
            print(f"{tag}: profiling ...", flush=True)
            row = profile(model, mm, work / f"{tag}.json", calib)
            row.update(config=name, max_memory=mm, params_16bit_bytes=weights_bytes(model))
            results["rows"][tag] = row
            print(f"{tag}: {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
    checks = {}
    for name in [*CONFIGS, "smollm2"]:
        whole = work / f"{name}@whole.json"
        for streamed in sorted(work.glob(f"{name}@*iB.json")):
            if whole.is_file():
                checks[streamed.stem] = same_profile(whole, streamed)
    results.update(settings=SETTINGS, calibration=str(calib), checks=checks,
                   machine="2-core CPU, 24 GiB (the development machine)",
                   date=time.strftime("%Y-%m-%d"))
    res_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n| run | 16-bit weights | max_memory | wall | peak RSS |\n|---|---|---|---|---|")
    for tag, r in results["rows"].items():
        print(f"| {tag} | {r['params_16bit_bytes'] / 2**30:.2f} GiB | {r['max_memory'] or '-'} | {r['wall_s']} s | "
              f"{r['peak_rss_mib']} MiB |")
    for name, c in checks.items():
        print(f"{name}: streamed == whole: {c}")
    print(f"-> {res_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
