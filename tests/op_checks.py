"""Run a direct call of a compiled op in a child process and check the error it raises.

The C++ boundary checks (TORCH_CHECK) must raise a RuntimeError naming the op and the argument. On one
platform (torch 2.11 + gcc 13.3, the GPU machine) a C++ exception thrown from the extension has been seen to
crash the process while the exception's backtrace is collected; in a child process such a crash fails this
one test with a clear message instead of taking the whole test run down.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

_PRELUDE = "import torch\nimport flashavatar.ops\n"


def assert_op_raises(code: str, pattern: str, timeout: float = 120.0) -> None:
    """Run ``code`` (after ``import torch, flashavatar.ops``) in a child; it must raise RuntimeError ~ pattern."""
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    script = (_PRELUDE + "try:\n" + body + "\nexcept RuntimeError as exc:\n    print('RAISED:', exc)\n"
              "else:\n    print('NO ERROR RAISED')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the op crashed the process ({name}) instead of raising:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RAISED:" in proc.stdout, f"no RuntimeError raised; stdout: {proc.stdout[-500:]}"
    assert re.search(pattern, proc.stdout), f"error message does not match {pattern!r}: {proc.stdout[-1000:]}"
