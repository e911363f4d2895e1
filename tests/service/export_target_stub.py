"""A stand-in export target for the service tests (the real GGUF / compressed-tensors targets
are separate modules): writes the plan's layer -> scheme map and the options it was given."""

import json


def export(plan, out, *, model, **options):
    (out / "schemes.json").write_text(json.dumps({"model": model, "options": options,
                                                  "layers": {f: lp.scheme for f, lp in plan.layers.items()}}))


def broken(plan, out, *, model, **options):
    """A target with a bug of its own: the job must fail as ``internal``, not the request's fault."""
    (out / "partial.bin").write_bytes(b"half")
    raise RuntimeError("the target's own bug")
