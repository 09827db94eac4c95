"""What every section of ``deltatl bench`` shares: timing, interleaving, machine info, output,
tensor-memory accounting and a dependency-free Spearman correlation."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

import numpy as np
import torch
from scipy.stats import ConstantInputWarning, spearmanr
from torch import Tensor, nn


def log(message: str) -> None:
    """Progress to stderr (stdout carries only JSON lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine a line was measured on: CPU, cores, torch version, device, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads(), "device": str(device),
                            "python": platform.python_version()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    info["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
    info["loadavg_1min_at_start"] = loadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class Bench:
    """One run of the suite: its options, device, machine, and where the JSON lines go."""

    args: Any
    device: torch.device
    machine: dict[str, Any]
    out: TextIO | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, section: str, row: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
        """Print one measurement as a JSON line (stdout, and ``--json-out``); also kept in ``lines``.

        Every line carries ``section``, ``kind``, the section's ``setup``, the ``machine`` and the
        1-minute load average when it was written (the machine is shared: read ratios, not times).
        """
        line = {"section": section, **row, "setup": setup, "machine": self.machine, "loadavg_1min": loadavg()}
        text = json.dumps(line)
        print(text, flush=True)
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()
        self.lines.append(line)
        return line


# --- timing ---------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def repeated(fn: Callable[[], Any], times: int) -> Callable[[], Any]:
    """``fn`` called ``times`` times in a row (one timed sample of a short task)."""
    def run() -> Any:
        result = None
        for _ in range(times):
            result = fn()
        return result
    return run


def interleaved(tasks: dict[Any, Callable[[], Any]], repeats: int, device: torch.device
                ) -> tuple[dict[Any, list[float]], dict[Any, Any], dict[Any, dict[str, float]]]:
    """Run every task once per round, rotating the order each round, so that a load change on the
    shared machine hits all tasks alike; compare them round by round (see :func:`round_ratios`).

    Returns all wall times, the last results, and per task the medians of the system CPU time and of
    the minor page faults per call (large CPU tensors are fresh ``mmap`` s whose pages fault on first use).
    """
    names = list(tasks)
    times: dict[Any, list[float]] = {name: [] for name in names}
    sys_s: dict[Any, list[float]] = {name: [] for name in names}
    faults: dict[Any, list[float]] = {name: [] for name in names}
    results: dict[Any, Any] = {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            before = resource.getrusage(resource.RUSAGE_SELF)
            seconds, results[name] = timed(device, tasks[name])
            after = resource.getrusage(resource.RUSAGE_SELF)
            times[name].append(seconds)
            sys_s[name].append(after.ru_stime - before.ru_stime)
            faults[name].append(after.ru_minflt - before.ru_minflt)
    usage = {name: {"sys_s": round(median(sys_s[name]), 3), "minor_faults": int(median(faults[name]))}
             for name in names}
    return times, results, usage


def calibrated(tasks: dict[Any, Callable[[], Any]], min_seconds: float, device: torch.device,
               max_calls: int = 100) -> tuple[dict[Any, Callable[[], Any]], dict[Any, int]]:
    """Warm every task up once (first calls allocate memory and build kernels) and wrap the short
    ones so that one timed sample lasts at least ``min_seconds`` (timer and Python noise stay small).

    Returns the wrapped tasks and the calls per sample of each; per-call time = sample / calls.
    """
    calls = {}
    for name, fn in tasks.items():
        seconds, _ = timed(device, fn)
        calls[name] = max(1, min(max_calls, math.ceil(min_seconds / max(seconds, 1e-6))))
    return {name: repeated(fn, calls[name]) for name, fn in tasks.items()}, calls


def per_call(times: dict[Any, list[float]], calls: dict[Any, int]) -> dict[Any, list[float]]:
    return {name: [t / calls[name] for t in values] for name, values in times.items()}


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Ratios of two tasks' times taken in the same rounds (back to back, so under the same load)."""
    return [n / d for n, d in zip(numerator, denominator)]


def spread(values: Sequence[float]) -> list[float]:
    """[min, max] of the per-round values: how much the rounds disagreed."""
    return [round(min(values), 4), round(max(values), 4)]


# --- tensor memory --------------------------------------------------------------------------------

def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def resident_tensors(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None,
                     extra: Iterable[Tensor] = ()) -> list[Tensor]:
    """Tensors that live between steps: parameters, buffers (source network, L2-SP starting point,
    attention weights), gradients, optimizer state, and ``extra`` (the batch)."""
    tensors: list[Tensor] = list(extra)
    for module in modules:
        for param in module.parameters():
            tensors += [param, param.grad]
        tensors += list(module.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop chatter on fd 2 (and its Python warnings)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_memory(step: Callable[[], Any], resident: Callable[[], list[Tensor]], device: torch.device,
                reset: Callable[[], None]) -> dict[str, int]:
    """Tensor memory of a training step in steady state: ``{"static", "transient", "peak"}`` bytes.

    ``reset()`` drops the gradients (``zero_grad(set_to_none=True)``); then two steps run and only
    the second is measured, so it starts like every later step (last step's gradients alive during
    its forward, momentum allocated).

    - ``static``: bytes of the tensors alive between steps (:func:`resident_tensors`) after the
      first step: weights of target and source, L2-SP starting point, gradients, momentum, the batch.
    - ``transient``: the largest growth of allocated bytes during the second step above its start
      (activations saved for backward, new gradients before the old ones are freed, temporaries).
    - ``peak`` = static + transient.

    CUDA: ``torch.cuda.max_memory_allocated`` (caching allocator, block-rounded). CPU: every
    allocation and free of torch's CPU allocator recorded by ``torch.profiler`` (``profile_memory``),
    summed in time order. Both count tensor bytes asked of torch's allocator, not what the process
    holds (no Python objects, no allocator caching or fragmentation, no glibc arenas): exact and
    independent of machine load, so the ratios between methods are exact.
    """
    reset()
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - start
        static = tensor_bytes(resident())
        return {"static": static, "transient": transient, "peak": static + transient}
    from torch._C._autograd import DeviceType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # Both steps inside the profile: the second step frees the first one's gradients, and a
        # free is only recorded (with its size) if its allocation was.
        with record_function("deltatl_bench_step_1"):
            step()
        with record_function("deltatl_bench_step_2"):
            step()
    events = list(prof.profiler.kineto_results.events())
    window = next((e.start_ns(), e.end_ns()) for e in events if e.name() == "deltatl_bench_step_2")
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live, at_start, highest = 0, None, 0
    for event in memory:
        if at_start is None and event.start_ns() >= window[0]:
            at_start = live
        live += event.nbytes()
        if window[0] <= event.start_ns() <= window[1]:
            highest = max(highest, live)
    at_start = live if at_start is None else at_start
    static = tensor_bytes(resident())
    transient = max(0, highest - at_start)
    return {"static": static, "transient": transient, "peak": static + transient}


# --- agreement ------------------------------------------------------------------------------------

def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (scipy's ``spearmanr``); NaN if either side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(a, b).statistic)
