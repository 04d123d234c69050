"""The machine a benchmark ran on, as one line for the head of its table.

Figures from different CPUs are not comparable (machines here are AMD with AVX2 only, or
Intel with AVX-512, AVX512-BF16 and AMX, where bfloat16 runs natively), so every table
starts with `describe()`: date, CPU model, the flags that decide which kernels run, cores,
memory and load. Benchmarks are run as scripts, so `import machine` finds this module.
"""

from __future__ import annotations

import os
import platform
import time

# The instruction-set flags (as /proc/cpuinfo spells them) that change which kernels run.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of RELEVANT_FLAGS it has (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [flag for flag in RELEVANT_FLAGS if flag in flags]


def has_native_bfloat16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 (bfloat16 matmuls run natively)."""
    flags = cpu_model_and_flags()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def proc_status(pid="self") -> dict:
    """The memory fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...) in
    bytes; {} once the process is gone. Writing "5" to /proc/self/clear_refs resets this
    process's VmHWM (its peak) to its VmRSS."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def peak_rss_bytes(pid="self") -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    return proc_status(pid).get("VmHWM", 0)


def rss_bytes(pid="self") -> int:
    """The process's resident memory now (VmRSS), in bytes; 0 once it is gone."""
    return proc_status(pid).get("VmRSS", 0)


def describe() -> str:
    """One line: UTC date and time, CPU model and flags, cores, memory, load average."""
    model, flags = cpu_model_and_flags()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {model} "
            f"({', '.join(flags) or 'no AVX2'}); {os.cpu_count()} cores, "
            f"{memory_gib():.0f} GiB, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    print(describe())
