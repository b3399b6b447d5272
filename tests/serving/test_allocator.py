"""The allocator tuning is accepted by the C library where it should be (glibc on Linux)."""

import subprocess
import sys


def test_glibc_accepts_the_thresholds():
    # a fresh interpreter, so the tuning cannot leak into the test process
    code = "from forcedphot.serving.allocator import keep_temporaries_on_heap; print(keep_temporaries_on_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import platform

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out == str(expected)
