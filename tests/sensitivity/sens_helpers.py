"""Helpers for the sensitivity tests: tiny random-weight transformers models (fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn().eval()


def make_llama(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed)


def make_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return _seeded(lambda: BertModel(cfg, add_pooling_layer=False), seed)


def checkpoint_lines(path: Path) -> list[dict]:
    """A checkpoint's item records (the header skipped, a torn last line dropped)."""
    import json

    out = []
    for line in path.read_text().splitlines()[1:] if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def sigkill_when(script: str, args: list[str], ready, *, timeout: float = 120, env: dict | None = None) -> None:
    """Run ``python -c script *args`` in the repository and SIGKILL it as soon as ``ready()``
    holds (polled every 20 ms); it must still be running then (a job that ended first has
    nothing to resume)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it was killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- block streaming (issue 17): a tiny Llama saved as a model directory ----------------

def save_tiny_llama(path, *, tie: bool, vocab: int = 300, blocks: int = 3):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=blocks, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)  # stored 16-bit, profiled in float32
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_ids(n=6, T=24, vocab=300):
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, vocab, (n, T), generator=g)


def stream_settings(**kw):
    return dict(schemes=["w2g32z", "w3g32z", "w4g32", "w4g32+h8r0.1", "fp16"], ref_schemes=["w2g32z", "w4g32+h8r0.1"],
                kl_samples=2, kl_stride=2, batch_size=2, progress=False, **kw)
