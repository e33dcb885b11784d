"""Ranks forked by a test process still run autograd after that process compiled a model.

Autograd's engine decides once per process, at its first backward, whether it starts threads for devices; once it
has, a forked child's backward raises "Unable to handle autograd's threading in combination with fork-based
multiprocessing". On torch's CUDA builds from PyPI (2.15.0+cu132, run on this GPU-less machine) a ``torch.compile``d
forward makes it count a device, so a pytest worker whose first backward came after some test compiled a model could
no longer fork ranks: ``test_ddp.py``'s and ``test_state_precision_sharded.py``'s ``ddp_fork`` tests failed so in a
full run under that torch (both pass alone). ``conftest.py`` runs the first backward before any test. This checks it
in a new process that imports the suite's ``conftest`` as pytest does, compiles, runs a backward and forks (on
torch 2.13.0+cpu, which CI pins, it passes without the fix too).
"""

import os
import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import conftest  # noqa: F401  (the suite's set-up, as each pytest worker imports it)
    import torch

    compiled = torch.compile(lambda a: (a * 2).sin())
    compiled(torch.ones(8, requires_grad=True)).sum().backward()
    pid = os.fork()
    if pid == 0:
        try:
            (torch.ones(3, requires_grad=True) * 2).sum().backward()
        except RuntimeError as error:
            print(error, flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_a_child_forked_after_a_compiled_backward_runs_autograd(tmp_path):
    code = CODE.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
