"""The machine a benchmark ran on, for the first line of its output: the
CPU's model name, its core count and the vector extensions that decide
which kernels run (MKL, oneDNN and the loss's own kernels differ between
AVX2 and AVX-512 machines), or the GPU's name.

    python benchmarks/machine.py
"""

from __future__ import annotations

import os
import platform
from typing import Dict, List

#: cpuinfo flags worth naming, in the order printed.
VECTOR_FLAGS = (
    ("sse4_2", "SSE4.2"),
    ("avx", "AVX"),
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("avx512f", "AVX-512F"),
    ("avx512bw", "AVX-512BW"),
    ("avx512_vnni", "AVX-512-VNNI"),
    ("avx512_bf16", "AVX-512-BF16"),
    ("amx_tile", "AMX"),
    ("asimd", "NEON"),
    ("sve", "SVE"),
)


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return {}
    fields: Dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine()


def vector_extensions() -> List[str]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [name for flag, name in VECTOR_FLAGS if flag in flags]


def describe() -> str:
    """``CPU <model>, <n> cores, <extensions>`` (and the GPU, if any)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"CPU {cpu_model()}, {cores} cores, {' '.join(vector_extensions()) or 'no vector flags'}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f"; GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


if __name__ == "__main__":
    print(describe())
