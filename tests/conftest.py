import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# busy-waiting OpenMP threads collapse when another process holds a core (40x slower seen); passive is safe
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def load():
    """Load (once per session) a built-in pipeline by name."""
    from accel.loading import load_pipeline

    cache = {}

    def _load(name: str):
        if name not in cache:
            cache[name] = load_pipeline(name)
        return cache[name]

    return _load


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all overhead; one thread is as fast, and immune to OpenMP spin-waits when a core is busy
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
