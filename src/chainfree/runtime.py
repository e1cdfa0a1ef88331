"""Where and how long: the one device resolver and the one timer every layer uses.

Kept at the bottom of the package (it imports only torch and chainfree.errors) so ops, methods, the
trainer and the benches resolve devices and time work the same way: `resolve_device` turns 'auto' /
'cpu' / 'cuda' / 'cuda:N' into a torch.device (a clear error when CUDA is asked for and absent),
`time_fn` measures a closure (CUDA events on a GPU, perf_counter on CPU), and `Stopwatch` times one
region, synchronising the device so queued kernels are counted where they ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch

from chainfree.errors import ConfigError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when visible, else CPU; a bare 'cuda' picks the local rank's GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a region in seconds, with the device synchronised at both ends.

        with Stopwatch(device) as sw:
            ...
        sw.seconds
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = float("nan")
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        if self.device is not None:
            sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Median, min and max time of fn in ms: CUDA events around each call on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        timer = "cuda_events"
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        timer = "wall_clock"
    return {"median_ms": median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats,
            "warmup": warmup, "timer": timer}
