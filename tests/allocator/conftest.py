import pytest


@pytest.fixture(scope="session")
def tiny_profile(tmp_path_factory):
    """A real profile of the random-weight tiny Llama (plumbing only), saved to JSON."""
    import bitalloc

    d = tmp_path_factory.mktemp("tiny")
    path = d / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=2, out=path,
                             progress=False, log=None)
    return prof, path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
