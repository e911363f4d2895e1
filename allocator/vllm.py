"""What vLLM needs from a plan: one scheme per fused module, and which kernels can run a layer.

vLLM fuses sibling projections into one module (``q_proj, k_proj, v_proj`` ->
``qkv_proj``; ``gate_proj, up_proj`` -> ``gate_up_proj``; BERT's ``query, key, value``)
and gives the fused module one quantization scheme: shards with different schemes are an
error when it loads the checkpoint. ``bitalloc solve --target vllm`` therefore ties those
layers (each must take the same scheme; each still pays its own bits).

Kernel families (read from vLLM's code, ``model_executor/layers/quantization/kernels/
mixed_precision`` and ``compressed_tensors_wNa16.py``; not run here, this machine has no
GPU). vLLM's compressed-tensors W*A16 scheme accepts 4 and 8 bits only (``uint4b8`` /
``uint8b128`` symmetric, ``uint4`` / ``uint8`` with zero-points), so 2, 3, 5 and 6-bit
layers have no vLLM kernel at all. The shape checks use the fused module's shape
(``in`` = input features, ``out`` = summed output features of the shards):

=========  =========================================================================
marlin     sm80+; symmetric 4/8-bit, asymmetric 4-bit; group -1 (channel), 32, 64, 128;
           out % 64 == 0, in % 128 == 0, group divides in
machete    sm90 only; symmetric 4/8-bit, asymmetric 4/8-bit; group -1, 64, 128;
           in % 64 == 0, out % 128 == 0
exllama    sm60+; symmetric 4/8-bit, float16 activations; group divides in;
           out % (32 / bits) == 0
triton     sm70+ (GPTQ Triton); symmetric 4-bit only, float16 activations; group divides in
=========  =========================================================================
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["FUSED", "fused_groups", "fused_name", "fused_shapes", "kernel_families", "KERNELS", "TARGETS",
           "ct_unexpressible", "target_schemes"]

TARGETS = ("vllm",)

# fused module name -> the sibling leaf names it is made of (same parent module)
FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "qkv": ("query", "key", "value"),  # BERT-style attention (vLLM's BertModel fuses them)
}

KERNELS = ("marlin", "machete", "exllama", "triton")


def ct_unexpressible(scheme) -> str | None:
    """Why a scheme's weights have no compressed-tensors (pack-quantized) counterpart, or None.

    ``scheme`` is a :class:`bitalloc.kernels.formats.Scheme`. Activation quantization is not
    a reason here: its weights export, weight-only (``--fallback weight-only``)."""
    w = scheme.weight
    if not w.is_quantized:
        return None
    if scheme.high is not None:
        return "a high-impact split (a second format for some input channels) has no compressed-tensors counterpart"
    if w.kind != "int":
        return (f"{w.kind} codes with float16 group scales have no compressed-tensors counterpart "
                "(pack-quantized is integer only; nvfp4/mxfp4 use fp8/e8m0 scales)")
    return None


def target_schemes(schemes: Sequence[str], target: str | None) -> list[str]:
    """The candidate schemes a serving target can load: for ``vllm``, those whose weights
    compressed-tensors can express (no high-impact splits, integer codes), so a plan solved
    for it always exports; every scheme for no target."""
    if target is None:
        return list(schemes)
    from bitalloc.kernels.formats import parse_scheme

    return [s for s in schemes if ct_unexpressible(parse_scheme(s)) is None]


def fused_groups(fqns: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of layer names (in the given order) that vLLM fuses into one module; only groups
    with at least two of their members present are returned."""
    fqns = list(fqns)
    present = set(fqns)
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for f in fqns:
        parent, _, leaf = f.rpartition(".")
        for members in FUSED.values():
            if leaf not in members:
                continue
            group = tuple(f"{parent}.{m}" if parent else m for m in members)
            group = tuple(g for g in group if g in present)
            if len(group) > 1 and group[0] not in seen:
                seen.update(group)
                out.append(group)
    return out


def fused_name(fqn: str) -> str | None:
    """The vLLM fused module a layer belongs to (``model.layers.0.self_attn.qkv_proj``), else None."""
    parent, _, leaf = fqn.rpartition(".")
    for name, members in FUSED.items():
        if leaf in members:
            return f"{parent}.{name}" if parent else name
    return None


def kernel_families(bits: int, symmetric: bool, group_size: int | None, out_features: int, in_features: int,
                    act: str = "a16") -> dict[str, str | None]:
    """``{kernel: None if it can run the layer, else the reason it cannot}`` for an integer
    weight format (group_size None = per channel), by vLLM's rules (module docstring)."""
    g = -1 if group_size is None else int(group_size)
    res: dict[str, str | None] = {}
    if bits not in (4, 8):
        why = f"vLLM's compressed-tensors W{bits}A16 is not supported (4 and 8 bits only)"
        return {k: why for k in KERNELS}
    if act != "a16":
        why = f"activation quantization {act} with {bits}-bit weights is not a W*A16 kernel"
        return {k: why for k in KERNELS}

    def divides() -> bool:
        return g == -1 or in_features % g == 0

    # marlin
    if not symmetric and bits != 4:
        res["marlin"] = "asymmetric 8-bit is not a Marlin type"
    elif g not in (-1, 32, 64, 128):
        res["marlin"] = f"group {g} is not one of -1, 32, 64, 128"
    elif out_features % 64 or in_features % 128:
        res["marlin"] = f"shape out={out_features} in={in_features} needs out % 64 == 0 and in % 128 == 0"
    elif not divides():
        res["marlin"] = f"group {g} does not divide in={in_features}"
    else:
        res["marlin"] = None
    # machete
    if g not in (-1, 64, 128):
        res["machete"] = f"group {g} is not one of -1, 64, 128"
    elif in_features % 64 or out_features % 128:
        res["machete"] = f"shape out={out_features} in={in_features} needs in % 64 == 0 and out % 128 == 0"
    else:
        res["machete"] = None
    # exllama
    if not symmetric:
        res["exllama"] = "symmetric only"
    elif not divides() and g != -1:
        res["exllama"] = f"group {g} does not divide in={in_features}"
    elif out_features % (32 // bits):
        res["exllama"] = f"out={out_features} is not a multiple of {32 // bits}"
    else:
        res["exllama"] = None
    # triton
    if not symmetric or bits != 4:
        res["triton"] = "symmetric 4-bit only"
    elif not divides():
        res["triton"] = f"group {g} does not divide in={in_features}"
    else:
        res["triton"] = None
    return res


def fused_shapes(layers: Sequence[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """``{fqn: (out, in) of the module vLLM runs it in}``: a fused module's summed outputs for its
    shards, the layer's own shape otherwise. ``layers``: (fqn, out, in) in model order."""
    groups = fused_groups([f for f, _, _ in layers])
    shapes = {f: (o, i) for f, o, i in layers}
    out = dict(shapes)
    for g in groups:
        tot = sum(shapes[m][0] for m in g)
        for m in g:
            out[m] = (tot, shapes[m][1])
    return out
