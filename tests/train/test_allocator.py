"""retain_freed_memory: freed large buffers are reused without faulting their pages in again."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

PROBE = """
import json, resource, sys
import torch
from didbq.train.allocator import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
def faults_of_one_step():  # like a training step: two 64 MiB buffers (above any mmap threshold), both freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)
    y = x * 2
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
warm_up = [faults_of_one_step() for _ in range(3)]
print(json.dumps({"retained": retained, "warm_up": warm_up, "steady": [faults_of_one_step() for _ in range(6)]}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_retained_memory_is_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    default, retained = _probe("default"), _probe("retain")
    assert retained["retained"] and not default["retained"]
    assert min(default["steady"]) > pages, default  # each step maps fresh pages and faults them in
    # reused from the heap: most steps fault nothing (the kernel may still reclaim an idle block now and then)
    assert retained["warm_up"][0] > pages, retained
    assert sorted(retained["steady"])[3] < pages // 20, retained
    assert sum(retained["steady"]) < sum(default["steady"]) / 3, (retained, default)
