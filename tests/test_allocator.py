"""The host allocator policy: glibc keeps large freed blocks in its heap under ``retain``."""

import subprocess
import sys

import pytest

from ldm.training import train
from ldm.utils.allocator import apply_policy, glibc

# A child process (the policy is process-wide and cannot be undone): allocate an 8 MiB block and report
# how much the bytes malloc holds in mmapped blocks (mallinfo2.hblkhd) grew with it.
PROBE = """
import ctypes, sys
from ldm.utils.allocator import apply_policy
print("applied" if apply_policy(sys.argv[1]) else "unchanged")
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 8 * 2**20
before = libc.mallinfo2().hblkhd
block = libc.malloc(size)
print(libc.mallinfo2().hblkhd - before)
libc.free(block)
"""

needs_glibc = pytest.mark.skipif(glibc() is None, reason="the policy applies to glibc malloc only")


def probe(policy: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True)
    state, mmapped = out.stdout.split()
    return state, int(mmapped)


@needs_glibc
def test_retain_serves_large_blocks_from_the_heap():
    """Under glibc's default a fresh 8 MiB block is its own mmap (returned to the kernel on free); under
    ``retain`` it comes from the heap, whose freed memory is reused without fresh page faults."""
    state, mmapped = probe("default")
    assert state == "unchanged" and mmapped >= 8 * 2**20
    state, mmapped = probe("retain")
    assert state == "applied" and mmapped == 0


def test_unknown_policy_names_the_key_and_the_choices(make_cfg):
    with pytest.raises(ValueError, match=r"host_allocator='fast' is not a host allocator policy; expected one of "
                                         r"retain, default"):
        apply_policy("fast")
    cfg = make_cfg("ae_f8", "host_allocator=fast")
    with pytest.raises(ValueError, match="host_allocator='fast'"):
        train(cfg)
