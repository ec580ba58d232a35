"""keep_freed_memory: large tensors come from malloc's heap and stay there once freed;
every script's CPU process runs with it."""
import ctypes
import os
import platform
import subprocess
import sys

import pytest

from scripts import REPO

# mallinfo2 (glibc >= 2.33) tells how malloc served a block
glibc_malloc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                  reason="changes glibc's malloc only, and asks it through mallinfo2")

# Run in a child process: the setting lasts for the life of the process that makes it.
PROBE = """
import argparse, ctypes, ctypes.util, sys, torch
from gsparsity.cpu_memory import keep_freed_memory
from gsparsity.distributed import LaunchSettings, claim_device

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
{setup}
mapped_before = libc.mallinfo2().hblkhd
activations = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB, above any mmap threshold
mapped = libc.mallinfo2().hblkhd - mapped_before
del activations
print(mapped, libc.mallinfo2().fordblks)
"""


def mapped_and_free_bytes(setup: str, **environment: str) -> tuple[int, int]:
    """(bytes malloc mmap'ed for a 64 MiB tensor, free heap bytes after the tensor died),
    in a process that first ran ``setup``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), setup=setup)],
                            capture_output=True, text=True, check=True, env={**env, **environment})
    mapped, free = map(int, result.stdout.split())
    return mapped, free


@glibc_malloc
@pytest.mark.slow
def test_a_large_tensor_comes_from_the_heap_and_its_memory_is_kept_once_freed():
    mapped, free = mapped_and_free_bytes("assert keep_freed_memory()")
    assert mapped < 2**20  # not served by mmap
    assert free >= 64 * 2**20  # freed, but kept in the process


@glibc_malloc
@pytest.mark.slow
def test_without_it_malloc_maps_a_large_tensor_and_gives_it_back():
    mapped, free = mapped_and_free_bytes("pass")
    assert mapped >= 64 * 2**20
    assert free < 64 * 2**20


@glibc_malloc
@pytest.mark.slow
def test_a_process_that_claims_the_cpu_as_the_scripts_do_keeps_freed_memory():
    mapped, _ = mapped_and_free_bytes('claim_device(LaunchSettings(), "cpu", 0)')
    assert mapped < 2**20


@glibc_malloc
@pytest.mark.parametrize("environment", [{"MALLOC_MMAP_MAX_": "65536"},
                                         {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}])
@pytest.mark.slow
def test_malloc_set_up_through_the_environment_is_left_as_the_user_set_it(environment):
    mapped, _ = mapped_and_free_bytes("assert not keep_freed_memory()", **environment)
    assert mapped >= 64 * 2**20
