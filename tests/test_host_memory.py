import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]

# A jitted function whose compiled program holds a 67 MB temporary (the transposed exp(x)): larger than any block
# glibc would keep on its heap by default. Prints the page faults, in bytes, of its last 20 of 60 calls.
PROGRAM = """
import resource, sys
from llama_jax.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(x).T @ x[:, :8]))
x = jnp.ones((4096, 4096), jnp.float32)
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 64 * 2**20
for _ in range(40):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize())
"""


def _faulted_bytes(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(host_memory.glibc() is None,
                    reason="mallopt is glibc's; elsewhere keep_freed_memory does nothing (the test below checks that)")
def test_keep_freed_memory_stops_steps_from_faulting_their_temporaries_in():
    temp = 20 * 67 * 10**6  # bytes of temporaries over the 20 calls measured
    assert _faulted_bytes("default") > temp / 2  # glibc maps and unmaps the temporary at every call
    # Kept on the heap and reused. The heap may still grow by a temporary's worth once in the window (CI saw exactly
    # one: 67.4 MB), so allow up to 4 of the 20 calls' worth against the default's 10 or more.
    assert _faulted_bytes("keep") < temp / 5


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False


RELEASE = """
import sys
import numpy as np
from llama_jax.host_memory import keep_freed_memory, release_freed_memory
assert keep_freed_memory()
rss = lambda: int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024
keep = np.ones(1 << 20)  # allocated after the big block: the freed block is a hole below it, not the heap's top
big = np.ones(64 << 20)  # 512 MB, touched
pin = np.ones(1 << 20)
del big
held = rss()
release_freed_memory()
print(held, rss())
"""


@pytest.mark.skipif(host_memory.glibc() is None, reason="malloc_trim is glibc's")
def test_release_freed_memory_gives_back_what_keep_freed_memory_holds():
    r = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    held, after = map(int, r.stdout.split())
    assert held - after > 400 * 10**6, (held, after)  # the freed 512 MB block, even from the middle of the heap
