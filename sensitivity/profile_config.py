"""One profile configuration: :class:`ProfileConfig`, the settings of a profiling run.

A frozen dataclass validated on construction (torchao's config style): ``build_profile``,
``bitalloc.profile``, the run config's ``[profile]`` / ``[calibration]`` sections and the
``bitalloc profile`` command all make one, instead of re-declaring two dozen settings.
Importing it loads no torch. The defaults are those of :func:`build_profile` (every
calibration row, every position: the exact measurement); the CLI, the API and the run
config pass their cheaper defaults (``kl_samples=2``, ``kl_stride=2``) explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .defaults import DEFAULT_REF_SCHEMES, DEFAULT_SCHEMES, PAIR_MODELS, QUANTIZERS, SALIENCY_METHODS

__all__ = ["ProfileConfig", "SALIENCY_NAMES", "QUANTIZER_NAMES", "PAIR_NAMES", "HESSIAN_DTYPES", "REF_METHODS",
           "FISHER_LABELS"]

# the registries' names, torch-free (sensitivity.defaults)
SALIENCY_NAMES = SALIENCY_METHODS
QUANTIZER_NAMES = QUANTIZERS
PAIR_NAMES = PAIR_MODELS
HESSIAN_DTYPES = ("float32", "float64")
# how the reference values that calibrate the proxy are obtained: "measured" end to end per
# (layer, reference scheme), or "fisher": the output-Fisher estimate from one backward pass
# per calibration batch (sensitivity.fisher_refs; labels sampled from the model or the text's),
# or "hybrid": measured on every measure_every-th block, the Fisher corrected per layer kind elsewhere
REF_METHODS = ("measured", "fisher", "hybrid")
# "both": one forward, a backward per kind, two Fisher tables (the profile's fisher and fisher_text)
FISHER_LABELS = ("sampled", "text", "both")


def _error():
    from .errors import ProfileError

    return ProfileError



def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how (see :func:`bitalloc.sensitivity.build.build_profile`).

    Calibration: ``calibration`` (``"generated"``: text sampled from the model itself, or
    a text file path), ``n_samples`` x ``seq_len`` tokens, ``seed``. Sequences are stored
    as tuples; strings, ints and booleans are checked strictly (``"no"`` is not False).
    """

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    ref_schemes: tuple[str, ...] = DEFAULT_REF_SCHEMES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calibration: str = "generated"
    n_samples: int = 8
    seq_len: int = 256
    seed: int = 0
    kl_samples: int | None = None
    kl_stride: int = 1
    batch_size: int = 4
    quantize_tied: bool = False
    hessian_dtype: str = "float32"
    groups: tuple = ()
    measured: bool = False
    workers: int | None = None
    ray_address: str | None = None
    saliency: str = "hessian"
    quantizer: str = "rtn"
    pairs: str | None = None
    pair_schemes: tuple[str, ...] | None = None
    pair_ref: Any = None
    ref_method: str = "measured"
    fisher_labels: str = "sampled"
    fisher_table: bool = False
    measure_every: int = 3
    max_memory: Any = None

    def __post_init__(self) -> None:
        err = _error()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for k in ("schemes", "ref_schemes", "include", "exclude", "pair_schemes"):
            v = getattr(self, k)
            if v is None and k == "pair_schemes":
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                raise err(f"profile setting {k!r} must be a list of strings, got {v!r}")
            v = tuple(getattr(s, "name", s) for s in v)  # Scheme objects by name
            bad = [s for s in v if not isinstance(s, str) or not s]
            if bad:
                raise err(f"profile setting {k!r} must hold non-empty strings, got {bad[0]!r}")
            set_(k, v)
        from bitalloc.kernels.formats import FormatError, parse_scheme

        names = []
        for k in ("schemes", "ref_schemes") + (("pair_schemes",) if self.pair_schemes is not None else ()):
            out = []
            for s in getattr(self, k):
                try:
                    out.append(parse_scheme(s).name)
                except FormatError as e:
                    raise err(f"profile setting {k!r}: {e}") from None
            set_(k, tuple(out))
        names = list(self.schemes)
        if not names:
            raise err("profile setting 'schemes' must name at least one scheme")
        if len(set(names)) != len(names):
            raise err(f"schemes contain duplicates: {names}")
        for r in self.ref_schemes:
            if r not in names:
                raise err(f"ref scheme {r!r} is not one of the schemes ({', '.join(names)})")
        if not self.ref_schemes:
            raise err("ref_schemes must name at least one scheme to calibrate the proxy")
        from .patterns import check_pattern

        for k in ("include", "exclude"):
            for pat in getattr(self, k):
                check_pattern(pat, f"profile setting {k!r}", error=err)
        if not isinstance(self.calibration, (str, os.PathLike)) or not str(self.calibration):
            raise err(f"profile setting 'calibration' must be 'generated' or a text file path, got {self.calibration!r}")
        set_("calibration", str(self.calibration))
        for k, lo in (("n_samples", 1), ("seq_len", 2), ("seed", 0), ("kl_stride", 1), ("batch_size", 1)):
            v = getattr(self, k)
            if not _is_int(v) or v < lo:
                raise err(f"profile setting {k!r} must be an integer >= {lo}, got {v!r}")
        if self.kl_samples is not None and (not _is_int(self.kl_samples) or self.kl_samples < 1):
            raise err(f"profile setting 'kl_samples' must be a positive integer or None (all rows), got {self.kl_samples!r}")
        for k in ("quantize_tied", "measured", "fisher_table"):
            if not isinstance(getattr(self, k), bool):
                raise err(f"profile setting {k!r} must be true or false, got {getattr(self, k)!r}")
        dt = str(self.hessian_dtype).replace("torch.", "")
        if dt not in HESSIAN_DTYPES:
            raise err(f"profile setting 'hessian_dtype' must be one of {HESSIAN_DTYPES}, got {self.hessian_dtype!r}")
        set_("hessian_dtype", dt)
        for k, allowed in (("saliency", SALIENCY_NAMES), ("quantizer", QUANTIZER_NAMES)):
            if getattr(self, k) not in allowed:
                raise err(f"{k} must be one of {allowed}, got {getattr(self, k)!r}")
        if self.pairs is not None and self.pairs not in PAIR_NAMES:
            raise err(f"pairs must be one of {PAIR_NAMES} or None, got {self.pairs!r}")
        if self.pairs is not None and not self.measured:
            raise err("pair terms need the measured table (measured=True): M's diagonal is measured")
        if self.ref_method not in REF_METHODS:
            raise err(f"ref_method must be one of {REF_METHODS}, got {self.ref_method!r}")
        if self.fisher_labels not in FISHER_LABELS:
            raise err(f"fisher_labels must be one of {FISHER_LABELS}, got {self.fisher_labels!r}")
        if self.fisher_labels == "both" and not self.fisher_table:
            raise err("fisher_labels 'both' keeps a Fisher table per label kind: it needs fisher_table=True")
        if self.ref_method != "measured" and self.measured:
            raise err(f"ref_method {self.ref_method!r} estimates the references; measured=True measures every "
                      "scheme instead")
        if self.ref_method != "measured" and self.groups:
            raise err(f"ref_method {self.ref_method!r} estimates KL only; metric groups need ref_method 'measured'")
        if not _is_int(self.measure_every) or self.measure_every < 1:
            raise err(f"profile setting 'measure_every' must be an integer >= 1, got {self.measure_every!r}")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 1):
            raise err(f"workers must be a positive integer, got {self.workers!r}")
        if self.ray_address is not None and not isinstance(self.ray_address, str):
            raise err(f"ray_address must be a string, got {self.ray_address!r}")
        if self.max_memory is not None:
            self._check_streaming(err)
        if isinstance(self.groups, list):
            set_("groups", tuple(self.groups))
        if self.groups is None:
            set_("groups", ())
        if not isinstance(self.groups, tuple):
            raise err(f"profile setting 'groups' must be a list of metric groups, got {type(self.groups).__name__}")

    def _check_streaming(self, err) -> None:
        """``max_memory`` (block streaming, :mod:`sensitivity.streaming`): a size, and only the
        calibrated-proxy profile (measured, Fisher or hybrid references, the Fisher tables) or
        the measured table: what streaming implements."""
        from .sizes import parse_size

        try:
            n = parse_size(self.max_memory, "profile setting 'max_memory'")
        except ValueError as e:
            raise err(str(e)) from None
        object.__setattr__(self, "max_memory", n)
        refused = [("groups", bool(self.groups), "metric groups"),
                   ("pairs", self.pairs is not None, "pair terms"),
                   ("saliency", self.saliency == "fisher", "Fisher saliency (a backward pass)"),
                   ("quantizer", self.quantizer != "rtn", f"quantizer {self.quantizer!r}")]
        for k, bad, what in refused:
            if bad:
                raise err(f"profile setting {k!r}: block streaming (max_memory) does not support {what} yet; "
                          "it builds the calibrated-proxy profile (measured, fisher or hybrid references) or the "
                          "measured table")

    def replace(self, **changes) -> ProfileConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_settings(cls, base: ProfileConfig | None = None, **settings) -> ProfileConfig:
        """``base`` (default: the defaults) with ``settings``; an unknown name is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(settings) - known)
        if bad:
            raise _error()(f"unknown profile setting(s) {bad}; known: {sorted(known)}")
        return dataclasses.replace(base, **settings) if base is not None else cls(**settings)

    def calibration_spec(self):
        """The :class:`~bitalloc.sensitivity.calibration.CalibrationSpec` of these settings."""
        from .calibration import CalibrationSpec

        if self.calibration == "generated":
            return CalibrationSpec("generated", None, self.n_samples, self.seq_len, self.seed)
        return CalibrationSpec("file", self.calibration, self.n_samples, self.seq_len, self.seed)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}
