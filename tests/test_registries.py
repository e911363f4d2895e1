"""Name lists come from registries (dict name -> implementation); the CLI offers exactly them."""

from __future__ import annotations

import pytest


def test_light_name_lists_are_the_registries_keys():
    from bitalloc.sensitivity import defaults, pairs, proxy, saliency

    assert defaults.SALIENCY_METHODS == tuple(saliency.SALIENCY) == saliency.SALIENCY_METHODS
    assert defaults.QUANTIZERS == tuple(proxy.QUANTIZER_FNS) == proxy.QUANTIZERS
    assert defaults.PAIR_MODELS == pairs.PAIR_MODELS


def test_solver_methods_are_one_registry():
    import importlib

    from bitalloc import solvers
    from bitalloc.solvers.dispatch import SOLVER_METHODS

    solve = importlib.import_module("bitalloc.allocator.solve")  # (bitalloc.allocator.solve is the function)

    assert solvers.METHODS == ("auto", *SOLVER_METHODS)
    assert solve.METHODS == tuple(SOLVER_METHODS) + tuple(solve.QP_SOLVERS)
    assert set(solve.QP_METHODS) == {"qp", "qp-relax", "separable"}
    assert all(callable(f) for f in (*SOLVER_METHODS.values(), *solve.QP_SOLVERS.values()))


def _choices(parser, cmd: str, flag: str):
    sub = next(a for a in parser._actions if a.dest == "cmd").choices[cmd]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


@pytest.mark.parametrize("cmd,flag,source", [
    ("profile", "--saliency", "bitalloc.sensitivity.saliency:SALIENCY"),
    ("profile", "--quantizer", "bitalloc.sensitivity.proxy:QUANTIZER_FNS"),
    ("profile", "--pairs", "bitalloc.sensitivity.pairs:PAIR_MODELS"),
    ("solve", "--method", "bitalloc.allocator.solve:METHODS"),
    ("sweep", "--method", "bitalloc.allocator.solve:METHODS"),
    ("solve", "--backend", "bitalloc.solvers.ilp_backends:ILP_BACKENDS"),
    ("solve", "--group-norm", "bitalloc.allocator.policy:NORMALIZE"),
])
def test_cli_choices_come_from_the_registries(cmd, flag, source):
    import importlib

    from bitalloc.allocator.cli import build_parser

    mod, name = source.split(":")
    assert _choices(build_parser(), cmd, flag) == tuple(getattr(importlib.import_module(mod), name))


def test_saliency_registry_dispatches():
    import torch

    from bitalloc.sensitivity.saliency import SaliencyError, channel_saliency

    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # (out 2, in 2)
    H = torch.diag(torch.tensor([2.0, 0.5]))
    assert torch.allclose(channel_saliency(w, "hessian", H=H), torch.tensor([20.0, 2.0]))  # diag(H)_j * |W_j|^2
    F = torch.ones_like(w)
    assert torch.allclose(channel_saliency(w, "fisher", fisher=F), torch.tensor([10.0, 4.0]))
    with pytest.raises(SaliencyError, match="one of"):
        channel_saliency(w, "nope", H=H)


def test_solver_dispatch_rejects_unknown_method():
    import numpy as np

    from bitalloc import solvers

    p = solvers.AllocationProblem(np.array([[1.0, 0.0]]), np.array([[1, 2]]))
    with pytest.raises(solvers.ProblemError, match="method"):
        solvers.solve(p, 2, method="simplex")
    assert solvers.solve(p, 2, method="dp").choice.tolist() == [1]
