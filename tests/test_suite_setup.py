"""How the test suite itself runs: one torch thread per process, the slow tests collected first, and what was
imported by then frozen out of the garbage collector's walks."""

import gc
import os
import subprocess
import sys
import weakref

import torch


def test_tests_and_the_processes_they_start_run_torch_on_the_configured_threads_one_by_default():
    threads = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == threads
    code = "import torch; print(torch.get_num_threads())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == str(threads)


def test_slow_tests_come_first_and_each_module_s_tests_stay_together(request):
    items = request.session.items
    modules = [item.nodeid.split("::")[0] for item in items]
    runs = [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
    assert len(runs) == len(set(runs))  # one run of tests per module
    slow = [bool(item.get_closest_marker("slow")) for item in items]
    with_slow = {m for m, s in zip(modules, slow) if s}
    first_without = next((i for i, m in enumerate(runs) if m not in with_slow), len(runs))
    assert all(m not in with_slow for m in runs[first_without:])  # the modules with slow tests come first
    for module in with_slow:
        flags = [s for m, s in zip(modules, slow) if m == module]
        assert flags == sorted(flags, reverse=True), module  # and within each, its slow tests


def test_what_the_session_imported_is_frozen_and_a_cycle_a_test_makes_is_still_collected():
    assert gc.get_freeze_count() > 100_000  # torch and the test modules: a run's gc.collect() skips them

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
