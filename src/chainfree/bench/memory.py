"""Memory of a method's training step against exact backprop, in one process on one batch.

On a GPU: peak bytes of one full step (torch.cuda.max_memory_allocated, peak stats reset right before
the step and the allocator cache emptied between methods), the static bytes already allocated before it
(weights, optimizer state, buffers), the gradient bytes (one per trainable parameter element), and
  activation bytes = peak - static - gradients
i.e. what the step needs beyond the model, its gradients and its optimizer: saved activations and
temporaries, the part the methods change.
On any device (CPU included): `saved_peak_bytes`, the largest total size of tensors that autograd holds
for backward at any moment of the step, counted through torch.autograd.graph.saved_tensors_hooks (unique
storages, parameters excluded, freed when autograd releases them). It misses tensors a custom autograd
Function keeps as plain ctx attributes, and torch.func transforms (used by LBI's Jacobians) refuse the
hooks -- then it is None and the report says so. It also misses what activation checkpointing keeps in its
own frames, so compare checkpointed runs on the peak figures.
Off the GPU, peak and activation bytes come from torch's MemTracker (`tracked_step_memory`).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch

from chainfree.bench.cases import StepCase, build_step_case, shapes, sync


class SavedTensorMeter:
    """Context manager: peak live bytes of tensors saved for backward (unique storages, params excluded)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, references]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return t
        entry = self.live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        box = _Saved(t)
        weakref.finalize(box, self._release, key)
        return box

    @staticmethod
    def _unpack(box: Any) -> torch.Tensor:
        return box.tensor if isinstance(box, _Saved) else box

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def case_memory(case: StepCase, warmup: int = 1, saved_meter: bool = True) -> dict[str, Any]:
    """Memory figures of one step of `case` (after `warmup` steps, so optimizer state exists). `saved_meter=False`
    skips the saved-for-backward count (a compiled model would retrace under its hooks)."""
    for _ in range(warmup):
        case.step()
    params = list(case.model.parameters())
    row: dict[str, Any] = {
        "weight_bytes": unique_storage_bytes(params),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer_bytes": unique_storage_bytes(t for s in case.optimizer.state.values() for t in s.values()
                                  if torch.is_tensor(t) and t.numel() > 1),
    }
    if not saved_meter:
        row["saved_peak_bytes"] = None
        row["saved_note"] = "not counted (compiled model)"
    else:
        try:
            with SavedTensorMeter(params + list(case.model.buffers())) as meter:
                case.step()
            row["saved_peak_bytes"] = meter.peak
        except RuntimeError as e:  # torch.func refuses saved-tensor hooks
            row["saved_peak_bytes"] = None
            row["saved_note"] = str(e).splitlines()[0][:160]
    if case.device.type != "cuda" and saved_meter:
        row.update(tracked_step_memory(case, row["grad_bytes"]))
    if case.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        sync(case.device)
        static = torch.cuda.memory_allocated(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        case.step()
        sync(case.device)
        peak = torch.cuda.max_memory_allocated(case.device)
        row.update(static_bytes=static, peak_bytes=peak, activation_bytes=peak - static - row["grad_bytes"],
                   memory_source="torch.cuda.max_memory_allocated")
    return row


def tracked_step_memory(case: StepCase, grad_bytes: int) -> dict[str, Any]:
    """Peak bytes of one step off the GPU, from torch's MemTracker (a dispatch mode that follows every
    tensor storage alive during the step, the CPU stand-in for the CUDA allocator's peak). Same definition
    as on CUDA: activation = peak - static (weights, optimizer state, buffers) - gradients. A compiled
    model is opaque to it: then the figures are None and the row says why."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # a torch build without torch.distributed
        return {"peak_bytes": None, "tracked_note": f"MemTracker unavailable ({e})"}
    try:
        tracker = MemTracker()
        tracker.track_external(case.model, case.optimizer)
        with tracker:
            case.step()
        snap = tracker.get_tracker_snapshot("peak")
    except Exception as e:  # noqa: BLE001 -- compiled graphs and exotic ops refuse the dispatch mode
        return {"peak_bytes": None, "tracked_note": f"MemTracker failed: {str(e).splitlines()[0][:160]}"}
    peak = max((int(v.get("Total", 0)) for v in snap.values()), default=0)
    params = list(case.model.parameters())
    static = unique_storage_bytes(params) + unique_storage_bytes(case.model.buffers()) + unique_storage_bytes(
        t for s in case.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"peak_bytes": peak, "static_bytes": static, "activation_bytes": peak - static - grad_bytes,
            "memory_source": "torch MemTracker"}


def measure_memory(cfg, methods: list[tuple[str, dict[str, Any]]], batch: tuple[torch.Tensor, torch.Tensor],
                   device: torch.device, warmup: int = 1) -> dict[str, Any]:
    """Rows (one per method, 'exact' first and always present) with bytes and ratios vs exact."""
    if not any(name == "exact" for name, _ in methods):
        methods = [("exact", {}), *methods]
    rows = []
    for name, params in methods:
        case = build_step_case(cfg, name, params, batch, device)
        rows.append({"method": name, "params": params, **case_memory(case, warmup)})
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        for key in ("peak_bytes", "activation_bytes", "saved_peak_bytes"):
            if row.get(key) is not None and base.get(key):
                row[key.replace("_bytes", "_ratio")] = row[key] / base[key]
            row[key.replace("_bytes", "_mib")] = row[key] / 2**20 if row.get(key) is not None else None
    return {"bench": "memory", "device": str(device),
            "cpu_note": "CPU: peak and activation bytes from torch MemTracker (every storage alive during the "
                        "step), not an allocator peak" if device.type == "cpu" else None,
            "warmup": warmup, "shapes": shapes(cfg, batch), "rows": rows}


MEMORY_COLUMNS = [("method", "method"), ("peak_mib", "peak MiB"), ("peak_ratio", "peak ratio"),
                  ("activation_mib", "activation MiB"), ("activation_ratio", "activation ratio"),
                  ("saved_peak_mib", "saved-for-backward MiB"), ("saved_peak_ratio", "saved ratio")]
