"""How torch computes: the CPU's instruction set and thread count, and deterministic
kernels. params.yaml's `runtime` section; each stage's main() applies it first thing.

torch picks its CPU kernels (ATen's vectorised loops, oneDNN's convolutions, MKL) for
the processor it finds, and splits reductions over its threads. Both change the last
bits of every sum, and after a few hundred training steps every metric. On CUDA,
cuDNN and cuBLAS may pick algorithms that add in a different order from run to run.
So all three are params:

- `cpu_isa: avx2` caps ATen and oneDNN at AVX2, which any x86-64 CPU of the last
  decade has, so a run gives the same bytes on an AVX2 and an AVX-512 machine, and
  puts MKL on its SSE2 `COMPATIBLE` branch: MKL's AVX2 branch runs only on Intel
  processors (elsewhere MKL falls back to its own pick), and COMPATIBLE is its one
  branch that gives the same results on Intel's and AMD's. Training calls no MKL
  routine; the digit check's fit (matrix products) does. `native` lets each library
  pick the processor's best.
- `threads: N` sets torch's CPU threads (and OpenMP's and MKL's, for child processes).
- `deterministic: true` makes torch use deterministic algorithms only
  (`torch.use_deterministic_algorithms`, cuDNN deterministic and not benchmarking,
  cuBLAS with a fixed workspace), so that a rerun on the same GPU model gives the same
  bytes. On the CPU the kernels this project uses are deterministic already.

`apply()` must run before torch computes anything: each library reads its instruction
set cap once, at its first use. Importing a stage module computes nothing, so a stage
applies its runtime at the start of main(), and importing a stage module (from a
server, a notebook or a test) leaves the process as it was.
"""

from __future__ import annotations

import os

CPU_ISAS = ("avx2", "native")
# each library's own variable for "the same bytes on any x86-64 CPU with AVX2"
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "COMPATIBLE"}}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# cuBLAS's documented setting for reproducible results (read when its handle is made)
CUBLAS_ENV = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def runtime_env(cpu_isa: str, threads: int) -> dict[str, str | None]:
    """The environment a run with these settings needs; None removes a variable."""
    env: dict[str, str | None] = {name: None for name in ISA_ENV["avx2"]}
    env.update(ISA_ENV.get(cpu_isa, {}))
    env.update({name: str(threads) for name in THREAD_ENV})
    return env


def pin(cpu_isa: str, threads: int, environ=os.environ) -> None:
    """Set ENVIRON for CPU_ISA and THREADS."""
    for name, value in runtime_env(cpu_isa, threads).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def apply(runtime) -> None:
    """Make this process compute as RUNTIME (a stages.params.RuntimeParams) says.

    Raises StageError if torch has already fixed another CPU instruction set, which
    happens once it has computed anything."""
    import torch

    from stages.common import StageError

    pin(runtime.cpu_isa, runtime.threads)
    torch.set_num_threads(runtime.threads)
    if runtime.cpu_isa == "avx2" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        raise StageError("runtime.cpu_isa avx2 came too late: torch had already picked its "
                         "AVX-512 kernels; apply the runtime before any torch computation")
    set_deterministic(runtime.deterministic)


def set_deterministic(on: bool) -> None:
    """Deterministic algorithms only (ON), or torch's defaults: cuDNN without
    benchmarking either way, and cuBLAS with the fixed workspace it needs."""
    import torch

    if on:
        os.environ[CUBLAS_ENV[0]] = CUBLAS_ENV[1]
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
