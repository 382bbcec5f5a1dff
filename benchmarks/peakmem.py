"""Peak extra memory of one call, measured as the growth of the process's peak RSS in a fresh subprocess.

`setup` builds the inputs (and runs a warm-up on tiny inputs so code pages and lazy imports do not
count); `call` runs once. glibc hands large freed blocks back to the OS, so RSS follows live tensors.
Coarse (page granularity, whole process) but it sees every allocation, including those inside C++ kernels.
"""
import json
import os
import subprocess
import sys
import textwrap

_DRIVER = """
import resource, json, os, sys
sys.path.insert(0, {bench_dir!r})
import torch
torch.set_num_threads(2)
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{call}
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"extra_kb": after - before}}))
"""


def peak_extra_mb(setup, call):
    code = _DRIVER.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), setup=textwrap.dedent(setup),
                          call=textwrap.dedent(call))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["extra_kb"] / 1024.0
