"""Atomic, verifiable checkpoints: model/optimizer tensors in safetensors, everything else in JSON.

Layout: DIR/checkpoint/step_NNNNNNN/{model,optimizer,rng}.safetensors + state.json, and DIR/checkpoint/latest
(a small JSON pointer with SHA-256 checksums). A step folder is written under a temporary name, fsynced,
then renamed; `latest` is replaced atomically last. A crash at any moment leaves either the old or the new
checkpoint complete, never a half-written one that resume would trust. Resume refuses a checkpoint whose
files fail their checksum or whose config differs from the run's (never silently starting over).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chainfree.errors import CheckpointError

# Settings that may change between an interrupted run and its resume without changing the trajectory.
RESUMABLE_KEYS = {("train", "steps"), ("train", "eval_every"), ("train", "ckpt_every"), ("train", "device")}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors (safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 1) -> Path:
    """Write checkpoint `step` atomically under root/ and point root/latest at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # safetensors refuses shared storage (tied weights): store each tensor once by name
    model_sd = {k: v for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    tied = {}
    for k, v in list(model_sd.items()):
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            tied[k] = seen[ptr]
            del model_sd[k]
        else:
            seen[ptr] = k
    _save_tensors(model_sd, tmp / "model.safetensors")
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _save_tensors(rng_state(), tmp / "rng.safetensors")
    state = {"step": step, "config": config, "optimizer": opt_meta, "tied": tied, **(extra or {})}
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    pointer = {"step": step, "folder": final.name,
               "sha256": {p.name: _sha256(p) for p in sorted(final.iterdir())}}
    tmp_ptr = root / "latest.tmp"
    with open(tmp_ptr, "w") as f:
        json.dump(pointer, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp_ptr.replace(root / "latest")
    _fsync_dir(root)
    old = sorted(p for p in root.glob("step_*") if p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def has_checkpoint(root: Path) -> bool:
    return (root / "latest").is_file()


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) in RESUMABLE_KEYS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    return diffs


def load_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG from root/latest; returns state.json. Raises CheckpointError if the
    checkpoint is corrupt or was written by a different configuration."""
    try:
        pointer = json.loads((root / "latest").read_text())
        folder = root / pointer["folder"]
        checksums = pointer["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint pointer {root / 'latest'} is unreadable ({e}); delete {root} to start over"
        ) from None
    for name, digest in checksums.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is missing or corrupt (checksum mismatch); "
                f"delete {root} to start over or restore it from a backup"
            )
    state = json.loads((folder / "state.json").read_text())
    diffs = config_diff(state["config"], config)
    if diffs:
        raise CheckpointError(
            f"checkpoint in {root} was written with a different config ({'; '.join(diffs[:3])}); "
            "use the same config to resume or a new --out to start a new run"
        )
    model_sd = load_file(str(folder / "model.safetensors"))
    for alias, target in state.get("tied", {}).items():
        model_sd[alias] = model_sd[target]
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {root} does not fit this model: {str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(_optimizer_join(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]))
    set_rng_state(load_file(str(folder / "rng.safetensors")))
    return state
