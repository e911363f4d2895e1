"""A stand-in export target for the service tests (the real GGUF / compressed-tensors targets
are separate modules): writes the plan's layer -> scheme map and the options it was given."""

import json


def export(plan, out, *, model, **options):
    (out / "schemes.json").write_text(json.dumps({"model": model, "options": options,
                                                  "layers": {f: lp.scheme for f, lp in plan.layers.items()}}))
