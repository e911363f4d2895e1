"""The batch-run configuration (``bitalloc run CONFIG.toml``), validated on load.

Every section and key is optional; what is left out takes the embedded default, which is
the main job: SmolLM2-135M, self-generated calibration text, a sweep of budgets,
evaluation, a table, a plot and plans in the output folder. Unknown keys are errors (a
typo must not silently fall back to a default).

    [model]
    spec = "smollm2"                 # smollm2 | minilm | random:llama-tiny | a path
    [calibration]
    source = "generated"             # "generated" or a text file path
    n_samples = 8
    seq_len = 256
    seed = 0
    kl_samples = 2                   # rows used for the per-layer KL measurements
    kl_stride = 2                    # ... scored at every 2nd position (LM head + KL cost / 2)
    [profile]
    schemes = ["w2g64z", ...]        # candidate schemes
    include = []                     # layer name patterns (glob, or re:<regex>)
    exclude = []
    ref_schemes = ["w2g64z", "w3g128z", "w4g128z"]   # measured end to end to calibrate the proxy
                                     # (default: these, among the schemes)
    measured = false                 # true: measure every (layer, scheme) (the expensive table)
    workers = 0                      # profile on a local Ray instance with N workers (0: in-process):
                                     # Hessian shards, proxy rows, measured references / table
    ray_address = ""                 # or on an existing Ray cluster ("" : RAY_ADDRESS or none)
    ref_method = "auto"              # measured | fisher | hybrid (every measure_every-th block measured);
                                     # auto: hybrid for a causal LM on the bitalloc target, else measured
    measure_every = 3
    fisher_table = true              # also the output-Fisher estimate of every (layer, scheme)
                                     # (default: with ref_method auto, as that; else false)
    fisher_labels = "auto"           # the Fisher's labels: sampled from the model, the text's next
                                     # tokens, or both (two tables, twice the candidates to select from);
                                     # auto: both when calibrating on a text file, else sampled
    [solve]
    budgets = ["2.5bpw", "3bpw", "3.5bpw", "4bpw", "4.5bpw"]
    method = "ilp"                   # ilp | dp | lagrangian
    backend = "highs"                # highs | cbc
    select = true                    # solve on each candidate calibration, keep the plan with the lowest
    select_rows = 4                  # ... measured KL on the last select_rows calibration rows
                                     # (default: true where the profile has a Fisher table)
    select_ties = false              # also each table's plan with q/k/v and gate/up tied (never chosen in
                                     # the main job's measurements; 2x the selection time)
    select_screen = 0                # first measure every candidate on this many of those rows (0: none),
    select_keep = 3                  # ... then only the select_keep best on all select_rows
    select_metric = "kl"             # kl (to the 16-bit model) | nll (the calibration text's own loss)
    refine = 0                       # then at most this many more measurements of a local search from
                                     # the chosen plan (exact budget; allocator.candidates)
    [eval]
    text = "generated"               # "generated" (held-out, another seed) or a text file
    n_windows = 8
    seq_len = 256
    baselines = true                 # uniform and llama.cpp-style mixes beside each plan
    logits_memory = ""               # bound on logit-sized buffers, e.g. "512MiB" ("" : 1GiB or $BITALLOC_LOGITS_MEMORY)
    [output]
    dir = "bitalloc-out"
"""

from __future__ import annotations
from .. import BitallocError

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from bitalloc.kernels.formats import FormatError, parse_scheme
from bitalloc.sensitivity.defaults import DEFAULT_REF_SCHEMES, DEFAULT_SCHEMES

from .budget import parse_budget

__all__ = ["RunConfig", "ConfigError", "DEFAULT_SCHEMES", "DEFAULT_BUDGETS", "load_config"]

# Candidate and reference schemes: sensitivity.defaults.
DEFAULT_BUDGETS = ("2.5bpw", "3bpw", "3.5bpw", "4bpw", "4.5bpw")
# Proxy calibration: each layer measured end to end at a 2-, 3- and 4-bit reference (the rows
# follow those points; one reference alone under-predicts the 2-bit rows), on the first
# DEFAULT_KL_SAMPLES calibration rows scored at every DEFAULT_KL_STRIDE-th position.
MAX_CONFIG_BYTES = 1 << 20
SELECT_METRICS = ("kl", "nll")  # what the end-to-end selection measures (api.selection_fitness)
DEFAULT_KL_SAMPLES = 2
DEFAULT_KL_STRIDE = 2


def default_ref_schemes(schemes) -> tuple[str, ...]:
    """The references when none are named: the defaults among ``schemes``, else the first
    quantized scheme (a profile over other candidates still gets a calibrated proxy)."""
    from bitalloc.kernels.formats import parse_scheme

    names = [parse_scheme(s).name for s in schemes]
    picked = tuple(r for r in DEFAULT_REF_SCHEMES if r in names)
    if picked:
        return picked
    quantized = [n for n in names if parse_scheme(n).is_quantized]
    return (quantized[0],) if quantized else tuple(names[:1])


class ConfigError(BitallocError, ValueError):
    """The run configuration is malformed; the message names the key."""


@dataclass(frozen=True)
class ModelCfg:
    spec: str = "smollm2"


@dataclass(frozen=True)
class CalibrationCfg:
    source: str = "generated"
    n_samples: int = 8
    seq_len: int = 256
    seed: int = 0
    kl_samples: int = DEFAULT_KL_SAMPLES
    kl_stride: int = DEFAULT_KL_STRIDE


@dataclass(frozen=True)
class ProfileCfg:
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ref_schemes: tuple[str, ...] = ()  # () = default_ref_schemes(schemes)
    measured: bool = False
    workers: int = 0
    ray_address: str = ""
    groups: tuple = ()               # metric groups: [[profile.groups]] tables (sensitivity.groups)
    saliency: str = "hessian"        # hessian | obq | fisher: the channels split schemes keep high
    quantizer: str = "rtn"           # rtn | gptq
    target: str = "bitalloc"         # bitalloc | llamacpp (ggml types, ggml's quantizer, whole-GGUF budget)
    imatrix: bool = True             # llamacpp target: the Hessian diagonal as llama.cpp importance matrix
    ref_method: str = "auto"         # measured | fisher | hybrid | auto: how the reference values are obtained
    measure_every: int = 3           # hybrid: every N-th block measured end to end
    fisher_table: bool | None = None # also the output-Fisher estimate of every (layer, scheme); None: auto
    fisher_labels: str = "auto"      # auto | sampled | text | both (sensitivity.fisher_refs); auto: both on a
                                     # calibration file, sampled on generated calibration (RunConfig.fisher_labels)


@dataclass(frozen=True)
class SolveCfg:
    budgets: tuple[str, ...] = DEFAULT_BUDGETS
    method: str = "ilp"
    backend: str = "highs"
    group_weights: dict | None = None   # {group = weight}, see allocator.policy
    group_norm: str = "auto"            # auto | ref | range | none
    group_limits: dict | None = None    # {group = max predicted loss}
    group_shares: dict | None = None    # {group = fraction of the bit budget}
    target: str = ""                    # "" | vllm (q/k/v and gate/up tied to one scheme, as vLLM fuses them)
    select: bool | None = None          # solve on every candidate calibration (None: where there are several), keep the plan with the lowest
                                        # measured KL on select_rows calibration rows (allocator.candidates)
    select_rows: int = 4
    select_ties: bool = False           # candidates also solved with fused inputs tied (allocator.candidates)
    select_screen: int = 0              # every candidate first measured on this many of those rows (0: none) ...
    select_keep: int = 3                # ... and only the select_keep best on all select_rows
    select_metric: str = "kl"           # kl | nll: what the selection measures (nll: the calibration text's loss)
    refine: int = 0                     # local-search measurements after the selection (0: none)


@dataclass(frozen=True)
class EvalCfg:
    text: str = "generated"
    n_windows: int = 8
    seq_len: int = 256
    baselines: bool = True
    logits_memory: str = ""


@dataclass(frozen=True)
class OutputCfg:
    dir: str = "bitalloc-out"


@dataclass(frozen=True)
class RunConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    calibration: CalibrationCfg = field(default_factory=CalibrationCfg)
    profile: ProfileCfg = field(default_factory=ProfileCfg)
    solve: SolveCfg = field(default_factory=SolveCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    output: OutputCfg = field(default_factory=OutputCfg)

    def __post_init__(self) -> None:
        if not self.profile.ref_schemes and self.profile.target != "llamacpp":  # llamacpp: the target's own
            import dataclasses

            try:
                refs = default_ref_schemes(self.profile.schemes)
            except FormatError as e:
                raise ConfigError(f"[profile] {e}") from None
            object.__setattr__(self, "profile", dataclasses.replace(self.profile, ref_schemes=refs))
        for s in self.profile.schemes + self.profile.ref_schemes:
            try:
                parse_scheme(s)
            except FormatError as e:
                raise ConfigError(f"[profile] {e}") from None
        missing = [s for s in self.profile.ref_schemes if s not in self.profile.schemes]
        if missing:
            raise ConfigError(f"[profile] ref_schemes {missing} must also be in schemes")
        if not isinstance(self.profile.measured, bool):
            raise ConfigError(f"[profile] measured must be true or false, got {self.profile.measured!r}")
        w = self.profile.workers
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"[profile] workers must be an integer >= 0 (0: in-process), got {w!r}")
        if not isinstance(self.profile.ray_address, str):
            raise ConfigError(f"[profile] ray_address must be a string, got {self.profile.ray_address!r}")
        if self.profile.groups:
            from bitalloc.sensitivity.groups import parse_groups

            try:
                parse_groups(list(self.profile.groups), "[profile] groups")
            except ValueError as e:
                raise ConfigError(f"[profile] {e}") from None
            if self.profile.measured:
                raise ConfigError("[profile] metric groups are not supported with measured = true yet")
        try:
            self.group_policy()
        except ValueError as e:
            raise ConfigError(f"[solve] {e}") from None
        for k in ("include", "exclude"):
            for pat in getattr(self.profile, k):
                from bitalloc.sensitivity.patterns import check_pattern

                check_pattern(pat, f"[profile] {k}", error=ConfigError)
        if self.eval.logits_memory:
            from bitalloc.sensitivity.logits import parse_size

            try:
                parse_size(self.eval.logits_memory, "[eval] logits_memory")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not isinstance(self.eval.baselines, bool):
            raise ConfigError(f"[eval] baselines must be true or false, got {self.eval.baselines!r}")
        if self.profile.saliency not in ("hessian", "obq", "fisher"):
            raise ConfigError(f"[profile] saliency must be hessian, obq or fisher, got {self.profile.saliency!r}")
        if self.profile.quantizer not in ("rtn", "gptq"):
            raise ConfigError(f"[profile] quantizer must be rtn or gptq, got {self.profile.quantizer!r}")
        if self.profile.target not in ("bitalloc", "llamacpp"):
            raise ConfigError(f"[profile] target must be bitalloc or llamacpp, got {self.profile.target!r}")
        if self.solve.target not in ("", "vllm"):
            raise ConfigError(f"[solve] target must be vllm (or absent), got {self.solve.target!r}")
        if self.profile.target == "llamacpp" and self.solve.target:
            raise ConfigError("[solve] target = vllm does not go with [profile] target = llamacpp (a GGUF plan)")
        if self.profile.target == "llamacpp" and (self.profile.groups or self.profile.quantizer != "rtn"):
            raise ConfigError("[profile] target = llamacpp uses ggml's quantizer and one KL table "
                              "(no quantizer or groups settings)")
        if self.profile.ref_method not in ("auto", "measured", "fisher", "hybrid"):
            raise ConfigError(f"[profile] ref_method must be auto, measured, fisher or hybrid, got {self.profile.ref_method!r}")
        if self.profile.ref_method not in ("auto", "measured") and (self.profile.measured or self.profile.groups):
            raise ConfigError(f"[profile] ref_method = {self.profile.ref_method} estimates KL references; it does not "
                              "go with measured = true or metric groups")
        if self.profile.target == "llamacpp" and (self.profile.ref_method not in ("auto", "measured")
                                                  or self.profile.fisher_table or self.solve.select):
            raise ConfigError("[profile] target = llamacpp measures its references in llama.cpp's types "
                              "(no ref_method, fisher_table or [solve] select)")
        from bitalloc.sensitivity.profile_config import FISHER_LABELS

        if self.profile.fisher_labels not in ("auto", *FISHER_LABELS):
            raise ConfigError(f"[profile] fisher_labels must be one of auto, {', '.join(FISHER_LABELS)}, got "
                              f"{self.profile.fisher_labels!r}")
        if self.profile.fisher_labels == "both" and not self.fisher_settings()[1]:
            raise ConfigError("[profile] fisher_labels = both keeps a Fisher table per label kind: it needs fisher_table")
        if self.profile.fisher_table and self.profile.groups:
            raise ConfigError("[profile] fisher_table estimates KL only; it does not go with metric groups")
        for b in self.solve.budgets:
            parse_budget(b)  # BudgetError names the budget
        from bitalloc.solvers.ilp_backends import ILP_BACKENDS

        from .solve import LINEAR_METHODS

        if self.solve.select_metric not in SELECT_METRICS:
            raise ConfigError(f"[solve] select_metric must be one of {', '.join(SELECT_METRICS)}, got "
                              f"{self.solve.select_metric!r}")
        if self.solve.method not in LINEAR_METHODS:
            raise ConfigError(f"[solve] method must be one of {', '.join(LINEAR_METHODS)}, got {self.solve.method!r}")
        if self.solve.backend not in ILP_BACKENDS:
            raise ConfigError(f"[solve] backend must be one of {', '.join(ILP_BACKENDS)}, got {self.solve.backend!r}")
        for sec, key in ((self.calibration, "n_samples"), (self.calibration, "seq_len"), (self.calibration, "kl_samples"), (self.calibration, "kl_stride"),
                         (self.solve, "select_rows"), (self.solve, "select_keep"), (self.profile, "measure_every"), (self.eval, "n_windows"), (self.eval, "seq_len")):
            v = getattr(sec, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")
        for key in ("refine", "select_screen"):
            v = getattr(self.solve, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {v!r}")

    def fisher_settings(self, kind: str = "causal-lm") -> tuple[str, bool, bool]:
        """(ref_method, fisher_table, select) with "auto" / unset resolved for a model of ``kind``:
        the hybrid references, the Fisher table and selection for a causal LM on the bitalloc
        target (the main job; experiments/README.md has what it costs and wins), measured
        references alone otherwise (encoders have no next-token Fisher; llama.cpp measures its
        own types; measured tables and metric groups measure)."""
        p = self.profile
        fisher_ok = kind == "causal-lm" and p.target == "bitalloc" and not p.measured and not p.groups
        method = p.ref_method if p.ref_method != "auto" else ("hybrid" if fisher_ok else "measured")
        table = p.fisher_table if p.fisher_table is not None else (fisher_ok and p.ref_method == "auto")
        select = self.solve.select if self.solve.select is not None else bool(table)
        return method, bool(table), bool(select)

    def fisher_labels(self, kind: str = "causal-lm") -> str:
        """[profile] fisher_labels with "auto" resolved: both label kinds (two Fisher tables, nine
        candidate calibrations) where the run has a Fisher table and calibrates on a text file,
        the sampled labels alone on generated calibration, whose next tokens were themselves
        sampled from the model (a second table would be a second draw of the same estimate);
        "sampled" where there is no table."""
        fisher_table = self.fisher_settings(kind)[1]
        labels = self.profile.fisher_labels
        if labels == "auto":
            labels = "both" if fisher_table and self.calibration.source != "generated" else "sampled"
        return labels if fisher_table or labels != "both" else "sampled"  # an encoder: no table

    def profile_config(self, kind: str = "causal-lm"):
        """The [profile] and [calibration] sections as one
        :class:`~bitalloc.sensitivity.profile_config.ProfileConfig` (for a model of ``kind``)."""
        from bitalloc.sensitivity.profile_config import ProfileConfig

        p, c = self.profile, self.calibration
        ref_method, fisher_table, _ = self.fisher_settings(kind)
        return ProfileConfig(
            schemes=p.schemes, ref_schemes=p.ref_schemes, include=p.include, exclude=p.exclude,
            calibration=c.source, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed,
            kl_samples=c.kl_samples, kl_stride=c.kl_stride, groups=tuple(p.groups), measured=p.measured,
            workers=p.workers or None, ray_address=p.ray_address or None, saliency=p.saliency, quantizer=p.quantizer,
            ref_method=ref_method, fisher_table=fisher_table, measure_every=p.measure_every,
            fisher_labels=self.fisher_labels(kind))

    def group_policy(self):
        """The [solve] group_* keys as an :class:`allocator.policy.GroupPolicy`."""
        from .policy import GroupPolicy

        s = self.solve
        return GroupPolicy(weights=s.group_weights, normalize=s.group_norm, limits=s.group_limits, shares=s.group_shares)

    def to_dict(self) -> dict:
        return {f.name: {g.name: _plain(getattr(getattr(self, f.name), g.name)) for g in fields(getattr(self, f.name))}
                for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        sections = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
        kw = {}
        for name, f in sections.items():
            sec_cls = f.default_factory  # type: ignore[misc]
            sd = d.get(name, {})
            if not isinstance(sd, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            known = {g.name: g for g in fields(sec_cls)}
            bad = set(sd) - set(known)
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in [{name}]; known: {sorted(known)}")
            from bitalloc.sensitivity.artifact import validate

            from .config_schema import SECTIONS

            validate(SECTIONS[name], sd, f"{source} [{name}]", error=ConfigError)  # types, strictly
            vals = {k: tuple(v) if isinstance(v, list) else v for k, v in sd.items()}
            kw[name] = sec_cls(**vals)
        return cls(**kw)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def load_config(path: str | Path | None) -> RunConfig:
    """Read a TOML run configuration; None gives the embedded default."""
    if path is None:
        return RunConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {p.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} a config may have")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML ({' '.join(str(e).split())})") from None
    return RunConfig.from_dict(d, source=f"config file {str(p)!r}")
