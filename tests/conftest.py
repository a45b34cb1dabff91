import os

# pytest-xdist's workers (README runs the suite with -n auto) share the machine's cores: each takes its
# share of threads, and so do the processes its tests start (the console script, DDP, Flower), which
# read OMP_NUM_THREADS when torch starts in them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

import pytest  # noqa: E402
import torch  # noqa: E402

# never reach for the network from tests: hub requests fail at once instead of timing out
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(_threads, torch.get_num_threads()))


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
