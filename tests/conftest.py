import gc
import os

# One thread per test process, and the processes the tests start inherit it (set before torch is imported, so
# it holds here too). The suite runs one xdist worker per core; torch's default of a thread per core on top made
# the threads of tiny runs wait for busy cores: a tiny run took 4x the CPU time with two threads on the 2-core
# machine. TORCHINDUCTOR_COMPILE_THREADS=1: compiling in the process itself, not in a pool of subprocesses that
# each import torch first. An explicit setting of either is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never reach a hub: fail fast instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file


def pytest_collection_finish(session):
    """Every run starts with a full gc.collect() (device.PeakMemory: cycles left by earlier runs are not the new
    run's memory), which walks every object the process holds: in a test process, with pytest, torch and every
    test module imported, ~0.17 s a run, over hundreds of runs. Freezing what exists once the tests are collected
    (imported modules: alive for the whole session anyway) leaves those collections only the objects the tests
    make; what a test leaves in cycles is still collected."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(session, config, items):
    """Slow tests first, within each module and of the modules that have them (each module's tests stay
    together, so a module-scoped fixture is built once): with xdist's work stealing, the long tests start early
    and the last ones to run are short, so both cores stay busy to the end."""
    def module(item):
        return item.nodeid.split("::")[0]

    slow = {id(item) for item in items if item.get_closest_marker("slow")}
    module_has_slow: dict[str, bool] = {}
    for item in items:
        module_has_slow[module(item)] = module_has_slow.get(module(item), False) or id(item) in slow
    module_order = {name: i for i, name in enumerate(module_has_slow)}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (not module_has_slow[module(item)], module_order[module(item)],
                                 id(item) not in slow, position[id(item)]))


@pytest.fixture
def one_thread():
    """For runs too small for a second thread to help: on a shared 2-core machine a second thread that waits
    for a busy core made them ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
