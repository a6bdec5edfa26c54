"""Test helper: run a test module's device tests in a child pytest process under numba's CUDA
simulator (it must be switched on before numba is imported, hence the child process)."""

import os
import re
import subprocess
import sys


def run_under_simulator(test_file: str, expected_passed: int, timeout: int) -> None:
    """Run ``test_file`` with NUMBA_ENABLE_CUDASIM=1; assert it passes with exactly
    ``expected_passed`` tests passed (a skipped-by-mistake test fails the count)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=timeout)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) == expected_passed, tail
