"""Replay step 9 of the default compare from a run's checkpoint after 8 steps (params + AdamW state + RNG).

    python benchmarks/sus_spike_replay.py RUN/checkpoint {exact|sus} OUT.json

RUN is a default-config CPU run stopped after step 8 (`chainfree.train.train(load_config(None,
['train.device="cpu"'], method=M, steps=60), RUN, stop_at=8)`). Step 9 is redone with (A) a SUS c=32
gradient (the restored RNG's next draw), (B) the exact gradient (same code path, c=1e12: every q = 1),
(C) four fresh SUS draws, and (D) the exact update with one parameter group's part taken from A (or A with
one group exact); each result is the loss on step 10's batch after that one update. This separates "SUS's
noise in this step" from "the state the trajectory reached" as the cause of the loss spike at the LR peak
(docs/sus.md). Results: benchmarks/results/sus_spike_cpu.{json,md}.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from chainfree.config import load_config
from chainfree.data import BatchSampler, load_tokens
from chainfree.ops.sus import sus_attention
from chainfree.training.trainer import Trainer, method_from_config, seeded_model

ckpt, method_name, out_path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg = load_config(None, ['train.device="cpu"'], method=method_name, steps=60)
method = method_from_config(cfg)
trainer = Trainer(cfg.train, method)
data = load_tokens(cfg.data)
cfg.model.fit_vocab(data.vocab_size)
state = trainer.setup(seeded_model(cfg, trainer.device))
assert trainer.resume(state, ckpt, cfg.to_dict()) and state.step == 8
sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
b9, b10 = sampler.batch("train", 8), sampler.batch("train", 9)
snap = (copy.deepcopy(state.model.state_dict()), copy.deepcopy(state.optimizer.state_dict()),
        torch.get_rng_state())


def restore() -> None:
    state.model.load_state_dict(snap[0])
    state.optimizer.load_state_dict(snap[1])
    torch.set_rng_state(snap[2])
    state.step = 8


def loss_on(batch) -> float:
    with torch.no_grad():
        x, y = batch
        return F.cross_entropy(state.model(x).flatten(0, 1).float(), y.flatten()).item()


def do_step(c: float, seed: int | None = None):
    restore()
    state.model.set_attention(partial(sus_attention, c=c, variant="bernoulli", backend="reference"))
    if seed is not None:
        torch.manual_seed(seed)
    stats = trainer.train_step(state, b9)
    delta = {n: (p.detach() - snap[0][n]) for n, p in state.model.named_parameters()}
    return stats, delta, loss_on(b10)


def group(n: str) -> str:
    for key, name in (("qkv_proj", "attn_qkv"), ("o_proj", "attn_out"), ("mlp", "mlp"), ("embed", "embed")):
        if key in n:
            return name
    return "norms"


def group_norm(d: dict[str, torch.Tensor], g: str) -> float:
    return float(sum(d[n].norm() ** 2 for n in d if group(n) == g)) ** 0.5


restore()
res: dict = {"loss_before_step9_on_b10": loss_on(b10)}
st_a, d_a, loss_a = do_step(32)
res["A_sus_own_draw"] = dict(loss_b10=loss_a, grad_norm=st_a.grad_norm)
_, d_b, loss_b = do_step(1e12)
res["B_exact"] = dict(loss_b10=loss_b)
res["C_sus_fresh_draws"] = [do_step(32, 100 + i)[2] for i in range(4)]
groups = sorted({group(n) for n in d_a})
res["update_norms"] = {g: dict(exact=group_norm(d_b, g), sus=group_norm(d_a, g),
                               diff=group_norm({n: d_a[n] - d_b[n] for n in d_a}, g)) for g in groups}


def apply_mix(pick) -> float:
    restore()
    with torch.no_grad():
        for n, p in state.model.named_parameters():
            p.copy_(snap[0][n] + (d_a[n] if pick(n) else d_b[n]))
    return loss_on(b10)


for g in groups:
    res[f"D_exact_update_but_sus_{g}"] = apply_mix(lambda n, g=g: group(n) == g)
    res[f"D_sus_update_but_exact_{g}"] = apply_mix(lambda n, g=g: group(n) != g)
print(json.dumps(res, indent=1), flush=True)
out_path.write_text(json.dumps(res, indent=1))
