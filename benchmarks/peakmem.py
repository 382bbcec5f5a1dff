"""Peak extra memory of one call: in a fresh subprocess, a thread samples the resident set size
(/proc/self/statm) every 0.5 ms while `call` runs; the result is the peak minus the RSS just before.

`setup` builds the inputs (and runs a warm-up on tiny inputs so code pages and lazy imports do not
count). glibc hands large freed blocks back to the OS, so RSS follows live tensors. Coarse (sampling,
page granularity, whole process) but it sees every allocation, including those inside C++ kernels.
"""
import json
import os
import subprocess
import sys
import textwrap

_DRIVER = """
import json, os, sys, threading, time
sys.path.insert(0, {bench_dir!r})
import torch
torch.set_num_threads(2)
page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
def rss_kb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page_kb
{setup}
before = rss_kb()
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.0005)
t = threading.Thread(target=sample, daemon=True)
t.start()
{call}
done.set(); t.join()
peak[0] = max(peak[0], rss_kb())
print(json.dumps({{"extra_kb": peak[0] - before}}))
"""


def peak_extra_mb(setup, call):
    code = _DRIVER.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), setup=textwrap.dedent(setup),
                          call=textwrap.dedent(call))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["extra_kb"] / 1024.0
