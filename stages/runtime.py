"""How the CPU computes: the instruction set and the thread count, pinned before torch starts.

torch picks its CPU kernels (ATen's vectorised loops, oneDNN's convolutions, MKL) for
the processor it finds, and splits reductions over its threads. Both change the last
bits of every sum, and after a few hundred training steps every metric. So both are
params (`runtime.cpu_isa`, `runtime.threads`), and `stages/__init__.py` applies them
from params.yaml before any stage imports torch:

- `cpu_isa: avx2` caps ATen, oneDNN and MKL at AVX2, which any x86-64 CPU of the last
  decade has, so a run gives the same bytes on an AVX2 and an AVX-512 machine;
  `native` lets each library pick the processor's best.
- `threads: N` sets OpenMP's and MKL's thread count (and torch's intra-op threads).

This module must not import torch: once torch has started, the ISA is fixed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

CPU_ISAS = ("avx2", "native")
# each library's own variable for "use no instruction set above AVX2"
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "AVX2"}}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def runtime_env(cpu_isa: str, threads: int) -> dict[str, str | None]:
    """The environment a run with these settings needs; None removes a variable."""
    env: dict[str, str | None] = {name: None for name in ISA_ENV["avx2"]}
    env.update(ISA_ENV.get(cpu_isa, {}))
    env.update({name: str(threads) for name in THREAD_ENV})
    return env


def pin(cpu_isa: str, threads: int, environ=os.environ) -> None:
    """Set ENVIRON for CPU_ISA and THREADS; must run before torch is imported."""
    for name, value in runtime_env(cpu_isa, threads).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def pin_from_params(path: str | Path = "params.yaml") -> bool:
    """Apply params.yaml's runtime section, if torch has not started yet.

    Returns whether it pinned. A missing file or a malformed section pins nothing here;
    stages.params reports the problem with its usual one-line error when the stage
    loads its params.
    """
    if "torch" in sys.modules:
        return False
    try:
        with open(path) as f:
            section = (yaml.safe_load(f) or {}).get("runtime")
        cpu_isa, threads = section["cpu_isa"], section["threads"]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return False
    if cpu_isa not in CPU_ISAS or type(threads) is not int or threads < 1:
        return False
    pin(cpu_isa, threads)
    return True
