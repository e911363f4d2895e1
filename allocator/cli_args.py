"""The ``bitalloc`` command line's arguments: one parser, every subcommand's flags and their
help (the commands themselves are in :mod:`.cli`; ``bitalloc peer``'s flags in
:mod:`.cli_peers`). Its errors are one line, ``bitalloc: error: ...``, exit 2."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser"]

EPILOG = """examples:
  bitalloc run                                   # the main job with the embedded default
  bitalloc run config.toml
  bitalloc profile --model smollm2 --out prof.json
  bitalloc solve prof.json --budget 3.5bpw --out plan.json
  bitalloc sweep prof.json --budgets 3bpw,3.5bpw,4bpw --out-dir plans/
  bitalloc apply --model smollm2 --plan plan.json --out qmodel/
  bitalloc eval --model smollm2 --plan plan.json --text ../shared/data/wikitext2-test.txt
  bitalloc serve --port 8750 --state-dir state/   # the HTTP service (docs at /docs)
  bitalloc eval --quantized qmodel/ --text ../shared/data/wikitext2-test.txt
"""


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``bitalloc: error: ...`` and exit 2, no usage block
    (``bitalloc COMMAND --help`` shows it)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"bitalloc: error: {self.prog}: {message.strip().splitlines()[0]} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from bitalloc.sensitivity.defaults import PAIR_MODELS, QUANTIZERS, SALIENCY_METHODS
    from bitalloc.sensitivity.profile_config import FISHER_LABELS, REF_METHODS
    from bitalloc.solvers.ilp_backends import ILP_BACKENDS

    from .candidates import CANDIDATES

    from .config import DEFAULT_KL_SAMPLES, DEFAULT_KL_STRIDE, DEFAULT_REF_SCHEMES, DEFAULT_SCHEMES
    from .policy import NORMALIZE
    from .solve import METHODS

    p = _Parser(
        prog="bitalloc", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Mixed-precision bit allocation: profile layer sensitivity, solve for the best "
                    "per-layer formats under an exact memory budget, build and evaluate the model.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def model_arg(sp, default="smollm2"):
        sp.add_argument("--model", default=default,
                        help="model spec: smollm2 (default), minilm, random:llama-tiny, random:gpt2-tiny, "
                             "a transformers model directory or a .gguf file")

    sp = sub.add_parser("profile", help="measure sensitivity: proxy table calibrated by measured KL")
    model_arg(sp)
    sp.add_argument("--calib", default="generated",
                    help="calibration text file, or 'generated' (sampled from the model itself; default)")
    sp.add_argument("--n-samples", type=int, default=8, help="calibration sequences (default 8)")
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--metric-samples", "--kl-samples", dest="metric_samples", type=int, default=DEFAULT_KL_SAMPLES,
                    help="calibration rows used for the per-layer metric (KL, ...) measurements "
                         f"(default {DEFAULT_KL_SAMPLES}; --kl-samples is the old spelling)")
    sp.add_argument("--logits-memory", default=None, metavar="SIZE",
                    help="bound on logit-sized buffers, e.g. 512MiB (default 1GiB; env BITALLOC_LOGITS_MEMORY): "
                         "logits and log-probs exist a chunk of positions at a time")
    sp.add_argument("--kl-stride", type=int, default=DEFAULT_KL_STRIDE,
                    help=f"score the KL at every N-th position of those rows (default {DEFAULT_KL_STRIDE})")
    sp.add_argument("--schemes", type=_csv, default=list(DEFAULT_SCHEMES),
                    help=f"comma-separated candidate schemes (default {','.join(DEFAULT_SCHEMES)}; "
                         "with --target llamacpp: llama.cpp's types q2_k,...,q8_0,iq4_nl,iq4_xs,f16,bf16 "
                         "(+ iq2_xs,iq2_s,iq3_xxs,iq3_s with the imatrix))")
    sp.add_argument("--target", choices=("bitalloc", "llamacpp"), default="bitalloc",
                    help="llamacpp: ggml's types and quantizer, the GGUF file as the budget (export --to gguf)")
    sp.add_argument("--no-imatrix", action="store_true",
                    help="with --target llamacpp: quantize without an importance matrix")
    sp.add_argument("--ref-schemes", type=_csv, default=None,
                    help="schemes measured end to end per layer to calibrate the proxy (default: "
                         f"{','.join(DEFAULT_REF_SCHEMES)} among --schemes, else the first quantized one)")
    sp.add_argument("--include", action="append", default=[], help="layer name pattern to include (repeatable)")
    sp.add_argument("--exclude", action="append", default=[], help="layer name pattern to exclude (repeatable)")
    sp.add_argument("--out", default="profile.json", help="where to write the profile (default profile.json)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sp.add_argument("--measured", action="store_true",
                    help="measure every (layer, scheme) end to end (the expensive table; resumable)")
    sp.add_argument("--workers", type=int, default=None,
                    help="profile on a local Ray instance with N workers: Hessian shards, proxy rows and "
                         "measurements (with --measured the whole table) run as checkpointed items (default in-process)")
    sp.add_argument("--ray-address", default=None,
                    help="profile on an existing Ray cluster, as --workers (default: $RAY_ADDRESS if set)")
    sp.add_argument("--checkpoint-dir", default=None,
                    help="with --measured, --workers, --ray-address or --max-memory: folder of the resumable checkpoints "
                         "(default: beside --out)")
    sp.add_argument("--saliency", choices=SALIENCY_METHODS, default="hessian",
                    help="input-channel saliency choosing the high-impact channels of split schemes")
    sp.add_argument("--quantizer", choices=QUANTIZERS, default="rtn",
                    help="quantizer of the profiled weights (gptq reuses the calibration Hessians)")
    sp.add_argument("--pairs", choices=PAIR_MODELS, default=None,
                    help="with --measured: same-block pair terms for `solve --method qp`")
    sp.add_argument("--pair-schemes", type=_csv, default=None, help="schemes the pair terms cover (default all)")
    sp.add_argument("--pair-ref", default=None, help="reduced pairs: the scheme both layers take (default the first)")
    sp.add_argument("--ref-method", choices=REF_METHODS, default="measured",
                    help="reference values that calibrate the proxy: measured end to end per (layer, reference), "
                         "or estimated by the output Fisher from one backward pass per batch (much faster)")
    sp.add_argument("--measure-every", type=int, default=3,
                    help="--ref-method hybrid: measure the references end to end on every N-th block (default 3); "
                         "elsewhere the Fisher estimate, corrected per layer kind by the measured ones")
    sp.add_argument("--fisher-table", action="store_true",
                    help="also store the output-Fisher estimate of every (layer, scheme): the candidate "
                         "calibrations `solve --table` and `run`'s [solve] select choose among")
    sp.add_argument("--max-memory", default=None, metavar="SIZE",
                    help="block streaming: read a model directory's safetensors (or a GGUF) one block at a time so the "
                         "profile fits SIZE (e.g. 1GiB); the calibrated proxy with measured, fisher or hybrid references and "
                         "the Fisher tables; with --workers "
                         "or --ray-address, SIZE per worker")
    sp.add_argument("--fisher-labels", choices=FISHER_LABELS, default="sampled",
                    help="Fisher labels: sampled from the model (the KL's Fisher), the text's next tokens, or both "
                         "(with --fisher-table: a table per kind from one forward pass, and `solve --table` / "
                         "`run`'s selection gains the '-text' calibrations)")

    def solve_args(sp):
        sp.add_argument("profile", help="a profile JSON written by `bitalloc profile`")
        sp.add_argument("--method", choices=METHODS, default="ilp",
                        help="qp: exact MILP with the profile's pair terms; qp-relax: cvxpy relaxation + repair; "
                             "separable: the ILP ignoring pairs (scored with them)")
        sp.add_argument("--backend", choices=ILP_BACKENDS, default="highs", help="ILP backend")
        sp.add_argument("--time-limit", type=float, default=None, help="ILP time limit in seconds")
        sp.add_argument("--schemes", type=_csv, default=None, help="restrict candidates to these schemes")
        sp.add_argument("--pin", action="append", help="PATTERN=SCHEME: force matching layers (repeatable)")
        sp.add_argument("--forbid", action="append", help="PATTERN=SCHEME: forbid a scheme there (repeatable)")
        sp.add_argument("--group-weight", action="append", metavar="GROUP=W",
                        help="weight of a metric group's normalised loss (repeatable; default 1)")
        sp.add_argument("--group-norm", choices=NORMALIZE, default="auto",
                        help="how group tables are normalised before weighting (auto: ref with several groups)")
        sp.add_argument("--group-limit", action="append", metavar="GROUP=EPS",
                        help="constraint: predicted loss of a group <= EPS in its metric's units (repeatable)")
        sp.add_argument("--group-share", action="append", metavar="GROUP=FRACTION",
                        help="MixDQ-style: the group gets this fraction of the bit budget (give every group)")
        sp.add_argument("--target", choices=("vllm",), default=None,
                        help="serving target: vllm ties the layers it fuses (q/k/v, gate/up) to one scheme")
        sp.add_argument("--table", choices=CANDIDATES, default="profile",
                        help="the candidate calibration to solve on (allocator.candidates; all but 'profile' "
                             "need a profile made with --fisher-table, the '-text' ones --fisher-labels both)")

    sp = sub.add_parser("solve", help="solve one budget: profile -> plan JSON")
    solve_args(sp)
    sp.add_argument("--server", default=None, metavar="URL",
                    help="solve on a bitalloc server: PROFILE is a profile id there, or a local file to upload")
    sp.add_argument("--token-file", default=None, help="with --server: file holding the bearer token")
    sp.add_argument("--budget", required=True,
                    help="3.5bpw (bits per weight over quantized layers), 120MB / 0.12GiB (whole model), "
                         "layers:90MB (quantized layers only); MB = 10^6 bytes, MiB = 2^20")
    sp.add_argument("--out", default="plan.json")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    sp = sub.add_parser("sweep", help="solve several budgets: profile -> plans and a table")
    solve_args(sp)
    sp.add_argument("--budgets", type=_csv, default=["2.5bpw", "3bpw", "3.5bpw", "4bpw", "4.5bpw"],
                    help="comma-separated budgets (default 2.5bpw,...,4.5bpw)")
    sp.add_argument("--out-dir", default="plans")
    sp.add_argument("--overwrite", action="store_true", help="replace plans already in --out-dir")

    sp = sub.add_parser("apply", help="quantize a model with a plan and save it (safetensors + plan)")
    model_arg(sp)
    sp.add_argument("--plan", required=True)
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--overwrite", action="store_true", help="replace a saved model already in --out")
    sp.add_argument("--hessians", default=None,
                    help="Hessian safetensors file (sensitivity.hessian_store), needed by a plan made with --quantizer gptq")

    sp = sub.add_parser("eval", help="perplexity and KL against the 16-bit model, for plans or a saved model")
    model_arg(sp, default=None)
    sp.add_argument("--plan", action="append", default=[], help="plan JSON (repeatable)")
    sp.add_argument("--quantized", action="append", default=[], metavar="DIR",
                    help="a quantized model saved by `bitalloc apply` (repeatable); without --model the "
                         "16-bit reference is the model it was made from")
    sp.add_argument("--text", default="generated",
                    help="evaluation text file, or 'generated' (held-out text sampled from the model)")
    sp.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    sp.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    sp.add_argument("--logits-memory", default=None, metavar="SIZE",
                    help="bound on logit-sized buffers, e.g. 512MiB (default 1GiB; env BITALLOC_LOGITS_MEMORY): "
                         "logits and log-probs exist a chunk of positions at a time")
    sp.add_argument("--gguf", action="append", default=[],
                    help="GGUF file whose perplexity llama.cpp computes (repeatable; the torch evaluation's windows, "
                         "tokenized by --model's tokenizer, else the first file's own; each later file is also "
                         "compared with the first window by window: ratio, bootstrap interval, windows lower)")


    sp = sub.add_parser("serve", help="the allocation service: profiles as jobs, plans on request (HTTP, /v1)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                    "anything but loopback needs --token-file)")
    sp.add_argument("--port", type=int, default=8750, help="port (default 8750; 0 picks a free one)")
    sp.add_argument("--state-dir", default="bitalloc-state",
                    help="database, artifacts and job folders (default ./bitalloc-state)")
    who = sp.add_mutually_exclusive_group()
    who.add_argument("--workers", type=int, default=None, help="job worker processes (default 1)")
    who.add_argument("--ray-address", default=None, help="run measured profiles' items on this Ray cluster")
    sp.add_argument("--token-file", default=None,
                    help="bearer tokens, one a line (or sha256:<hex>); required off loopback")
    sp.add_argument("--db-url", default=None,
                    help="SQLAlchemy database URL (default sqlite:///STATE/bitalloc.db, WAL mode)")
    sp.add_argument("--max-body-mb", type=float, default=8, help="limit of a JSON request body (default 8 MiB)")
    sp.add_argument("--max-upload-mb", type=float, default=1024, help="limit of a profile upload (default 1024 MiB)")
    sp.add_argument("--export-target", action="append", default=[], metavar="NAME=MODULE:FUNCTION",
                    help="offer an export target (repeatable)")
    sp.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    from .export import add_parser as add_export_parser

    add_export_parser(sub)

    from .cli_peers import add_parser as add_peer_parser

    add_peer_parser(sub)

    sp = sub.add_parser("run", help="the whole pipeline from a TOML config (default: the embedded main job)")
    sp.add_argument("config", nargs="?", default=None, help="CONFIG.toml (optional)")
    sp.add_argument("--out-dir", default=None, help="override [output] dir")
    sp.add_argument("--overwrite", action="store_true", help="replace the results and plans of an earlier run there")
    return p
