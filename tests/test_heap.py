"""gpus.runtime.heap: the plugin keeps its C heap across large requests instead of faulting
it back in on every one (issue 10, defect 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from test_server_support import short_tmpdir

import deviceplugin.main
import deviceplugin.server
from gpus.runtime import heap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(heap.glibc_version() is None, reason="glibc's malloc only")

# What a handler thread does with an 8,192-ID request: a few buffers of ~400 KiB, then frees
# them. Prints the page faults of each round after the first (mallopt is process-wide and
# cannot be undone, so each case runs in its own interpreter).
_ROUNDS = textwrap.dedent("""
    import resource, sys, threading
    from gpus.runtime.heap import steady_heap
    if sys.argv[1] == "steady":
        assert steady_heap()
    faults = []
    def rounds():
        for _ in range(20):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            buffers = [bytearray(384 * 1024) for _ in range(3)]
            del buffers
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
    print(sum(faults[1:]))
""")


def faults_after_first_round(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    return int(out.stdout)


@glibc_only
def test_steady_heap_reuses_the_memory_of_large_requests() -> None:
    # glibc's adaptive default trims the thread's heap after each round: ~256 faults a round.
    assert faults_after_first_round("default") > 19 * 100
    assert faults_after_first_round("steady") < 19 * 5


@glibc_only
def test_thresholds_keep_oversized_requests_out_of_the_heap() -> None:
    # A request at the node's device limit (~750 KiB) stays in the heap; one at the 2 MiB
    # receive limit is mmapped and given back when freed; each heap keeps at most 4 MiB.
    assert 750 * 1024 < heap.MMAP_THRESHOLD_BYTES < deviceplugin.server.MAX_MESSAGE_BYTES
    assert heap.TRIM_THRESHOLD_BYTES == 4 * 1024 * 1024


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "confstr", no_such_name)
    assert heap.glibc_version() is None
    assert heap.steady_heap() is False


def test_the_plugin_steadies_its_heap_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def steady_heap() -> bool:
        calls.append(True)
        return True

    monkeypatch.setattr(deviceplugin.main, "steady_heap", steady_heap)
    with short_tmpdir() as directory:
        missing = os.path.join(directory, "nope", "kubelet.sock")
        assert deviceplugin.main.main(["--nvml", "fake:dgx-a100", "--kubelet-socket",
                                       missing]) == 1
    assert calls == [True]
