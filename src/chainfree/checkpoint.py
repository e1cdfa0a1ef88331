"""Atomic, verifiable checkpoints: model/optimizer tensors in safetensors, everything else in JSON.

Layout: DIR/checkpoint/step_NNNNNNN/{model,optimizer,rng}.safetensors + state.json + manifest.json, and
DIR/checkpoint/latest (a small JSON pointer with SHA-256 checksums). A step folder is written under a
temporary name, fsynced, then renamed; `latest` is replaced atomically last. A crash at any moment leaves
either the old or the new checkpoint complete, never a half-written one that resume would trust.
Each step folder carries its own checksums (manifest.json), so a lost `latest` is recovered from the newest
step folder that verifies instead of silently starting over. Every reader goes through `verified_checkpoint`:
resume refuses a checkpoint whose files fail their checksum or whose config differs from the run's, and
`load_model_state` (used by generation) never hands out weights that fail their checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chainfree.errors import CheckpointError

MANIFEST = "manifest.json"  # per-folder checksums: lets a step folder be verified without `latest`

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
    manifest = {"step": step, "sha256": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
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


def _step_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def has_checkpoint(root: Path) -> bool:
    """Whether root holds anything a rerun must resume from (or refuse): a `latest` pointer or a step folder."""
    return (root / "latest").is_file() or bool(_step_folders(root))


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint folder whose files matched their SHA-256 checksums, with its parsed state.json.

    `recovered` is True when root/latest was missing and the folder was found by scanning the step folders.
    """

    folder: Path
    step: int
    state: dict[str, Any]
    recovered: bool = False


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              f"{fix}") from None


def _mismatches(folder: Path, checksums: dict[str, str]) -> list[str]:
    return [name for name, digest in checksums.items()
            if not (folder / name).is_file() or _sha256(folder / name) != digest]


def _parse_state(folder: Path, root: Path, recovered: bool) -> VerifiedCheckpoint:
    state = _read_json(folder / "state.json", "checkpoint state", f"delete {root} to start over")
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint state {folder / 'state.json'} lacks 'step'/'config'; "
                              f"delete {root} to start over")
    return VerifiedCheckpoint(folder, int(state["step"]), state, recovered)


def _recover(root: Path) -> VerifiedCheckpoint:
    """The newest step folder whose manifest.json checksums hold (root/latest is missing)."""
    tried = []
    for folder in _step_folders(root):
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            checksums = manifest["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            tried.append(f"{folder.name}: no readable {MANIFEST}")
            continue
        if not isinstance(checksums, dict) or "state.json" not in checksums:
            tried.append(f"{folder.name}: {MANIFEST} lists no state.json")
            continue
        bad = _mismatches(folder, checksums)
        if bad:
            tried.append(f"{folder.name}: {', '.join(bad)} fail their checksum")
            continue
        verified = _parse_state(folder, root, recovered=True)
        from chainfree.logging import console

        console.print(f"warning: {root / 'latest'} is missing; resuming from {folder.name}, the newest step folder "
                      "whose checksums verify", markup=False, highlight=False)
        return verified
    raise CheckpointError(
        f"{root / 'latest'} is missing and no step folder verifies ({'; '.join(tried) or 'none found'}); "
        f"restore {root / 'latest'} from a backup, or delete {root} to start over"
    )


def verified_checkpoint(root: Path) -> VerifiedCheckpoint:
    """The one verified checkpoint reader: root/latest's folder with every file checked against its SHA-256
    (or, when `latest` is gone, the newest step folder that verifies against its own manifest.json).

    Raises CheckpointError (one line: the problem and the fix) on a missing, unreadable or corrupt checkpoint.
    """
    root = Path(root)
    pointer_path = root / "latest"
    if not pointer_path.is_file():
        if not _step_folders(root):
            raise CheckpointError(f"{root} holds no checkpoint (no 'latest' and no step_* folder)")
        return _recover(root)
    fix = (f"delete {pointer_path} to resume from the newest step folder that verifies, "
           f"or delete {root} to start over")
    pointer = _read_json(pointer_path, "checkpoint pointer", fix)
    try:
        folder = root / str(pointer["folder"])
        checksums = dict(pointer["sha256"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"checkpoint pointer {pointer_path} lacks 'folder'/'sha256'; {fix}") from None
    if "state.json" not in checksums:
        raise CheckpointError(f"checkpoint pointer {pointer_path} lists no checksum for state.json; {fix}")
    bad = _mismatches(folder, checksums)
    if bad:
        path = folder / bad[0]
        raise CheckpointError(
            f"checkpoint file {path} is missing or corrupt (checksum mismatch); "
            f"delete {root} to start over or restore it from a backup"
        )
    return _parse_state(folder, root, recovered=False)


def load_model_state(root: Path) -> tuple[dict[str, torch.Tensor], VerifiedCheckpoint]:
    """(model state_dict, checkpoint) from the verified checkpoint under root, tied weights re-aliased."""
    ckpt = verified_checkpoint(root)
    model_sd = load_file(str(ckpt.folder / "model.safetensors"))
    for alias, target in ckpt.state.get("tied", {}).items():
        model_sd[alias] = model_sd[target]
    return model_sd, ckpt


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's config and the run's. A setting the checkpoint does not
    have (added to chainfree after it was written) counts as equal when the run keeps its default."""
    from chainfree.config import SECTIONS, setting_defaults

    defaults = {section: setting_defaults(cls) for section, cls in SECTIONS.items()}
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) in RESUMABLE_KEYS:
                continue
            if key not in a and key in defaults.get(section, {}) and b.get(key) == defaults[section][key]:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    return diffs


def load_checkpoint(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG from the verified checkpoint under root (`verified_checkpoint`);
    returns state.json. Raises CheckpointError if the checkpoint is corrupt or was written by a different
    configuration."""
    model_sd, ckpt = load_model_state(root)
    state, folder = ckpt.state, ckpt.folder
    diffs = config_diff(state["config"], config)
    if diffs:
        raise CheckpointError(
            f"checkpoint in {root} was written with a different config ({'; '.join(diffs[:3])}); "
            "use the same config to resume or a new --out to start a new run"
        )
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {root} does not fit this model: {str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(_optimizer_join(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]))
    set_rng_state(load_file(str(folder / "rng.safetensors")))
    return state
