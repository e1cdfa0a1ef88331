"""The Trainer's step against exact autograd (float64), gradient accumulation against the large batch,
callbacks (order, Ctrl-C checkpoint and resume), the Method protocol and the model factory."""

import copy
import math

import pytest
import torch
from torch import nn

from chainfree.config import ModelConfig, TrainConfig, load_config
from chainfree.errors import ConfigError
from chainfree.logging import read_metrics
from chainfree.methods import Method, StepStats, build_method
from chainfree.methods.base import NoParams
from chainfree.models import build_model
from chainfree.train import train
from chainfree.training import Callback, Trainer, lr_at


def vision_cfg(**kw) -> ModelConfig:
    return ModelConfig(kind="vision", in_features=12, n_classes=5, d_model=16, n_layers=3, **kw)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def fp64_train(**kw) -> TrainConfig:
    base = {"device": "cpu", "dtype": "fp64", "steps": 10, "warmup_steps": 2, "lr": 1e-2, "grad_clip": 0.5}
    return TrainConfig(**{**base, **kw})


def test_train_step_is_clip_and_adamw_on_the_exact_gradient():
    torch.manual_seed(0)
    model = build_model(vision_cfg()).double()
    reference = copy.deepcopy(model)
    tc = fp64_train()
    trainer = Trainer(tc, build_method("exact"))
    state = trainer.setup(model)
    x, y = batch()
    stats = trainer.train_step(state, (x, y))

    loss = reference(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), tc.grad_clip)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    other = [p for p in reference.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr_at(0, tc), betas=(tc.beta1, tc.beta2))
    opt.step()
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-14)
    assert stats.grad_norm == pytest.approx(float(norm), rel=1e-14)
    assert stats.lr == lr_at(0, tc) and stats.tokens == 8 and state.step == 1
    for p, q in zip(state.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_the_large_batch(accum):
    """grad_accum micro-batches of B/k rows give the mean gradient of the B-row batch (equal-size means
    averaged): same loss, grad norm and parameters up to float64 reassociation."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=16)  # float64 end to end
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (8, 17), generator=g) for _ in range(3)]
    runs = []
    for k in (1, accum):
        torch.manual_seed(0)
        trainer = Trainer(fp64_train(grad_accum=k, batch_size=8), build_method("exact"))
        state = trainer.setup(build_model(cfg).double())
        stats = [trainer.train_step(state, (b[:, :-1], b[:, 1:])) for b in batches]
        runs.append((stats, list(state.model.parameters())))
    (s1, p1), (sk, pk) = runs
    for a, b in zip(s1, sk, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-13)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-12)
    for a, b in zip(p1, pk, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config(overrides=["train.batch_size=6", "train.grad_accum=4"])
    trainer = Trainer(fp64_train(grad_accum=2, batch_size=8), build_method("exact"))
    state = trainer.setup(build_model(vision_cfg()).double())
    with pytest.raises(ConfigError, match="train.grad_accum=2"):
        trainer.train_step(state, batch(7))


class DuckMethod:
    """A method that does not subclass Method: the protocol is structural."""

    name = "duck"
    Config = NoParams
    uses_autograd_step = True

    def __init__(self) -> None:
        self.config = None
        self.calls = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        self.calls += 1
        loss = model(inputs, targets)
        loss.backward()
        return StepStats(float(loss.detach()), targets.numel(), {"calls": float(self.calls)})

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(inputs, targets)

    def strategy(self, launch) -> str:
        return "single"

    def describe(self) -> dict:
        return {"name": self.name}


def test_a_structural_method_trains_and_callbacks_run_in_order():
    method = DuckMethod()
    assert isinstance(method, Method)
    seen: list[tuple[str, int]] = []

    class Tag(Callback):
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def on_fit_begin(self, trainer, state) -> None:
            seen.append((f"{self.tag}:begin", state.step))

        def on_step_end(self, trainer, state, record) -> None:
            record[self.tag] = len(seen)
            seen.append((self.tag, state.step))

        def on_fit_end(self, trainer, state) -> None:
            seen.append((f"{self.tag}:end", state.step))

    trainer = Trainer(fp64_train(steps=3), method, callbacks=[Tag("a"), Tag("b")])
    state = trainer.setup(build_model(vision_cfg()).double())
    trainer.fit(state, lambda step: batch(seed=step))
    assert seen == [("a:begin", 0), ("b:begin", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3),
                    ("a:end", 3), ("b:end", 3)]
    assert method.calls == 3 and state.step == 3


def test_ctrl_c_checkpoints_and_the_rerun_resumes_exactly(tiny, tmp_path):
    class Interrupt(Callback):
        def on_step_end(self, trainer, state, record) -> None:
            if state.step == 4:
                raise KeyboardInterrupt

    train(load_config(overrides=tiny()), tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=tiny()), tmp_path / "split", progress=False, callbacks=[Interrupt()])
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3, 4]
    train(load_config(overrides=tiny()), tmp_path / "split", progress=False)
    full = [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    split = [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert split == full


def test_non_finite_loss_stops_with_a_clear_error():
    class Diverge(DuckMethod):
        def step(self, model, inputs, targets) -> StepStats:
            stats = super().step(model, inputs, targets)
            stats.loss = math.nan
            return stats

    trainer = Trainer(fp64_train(steps=2), Diverge())
    state = trainer.setup(build_model(vision_cfg()).double())
    with pytest.raises(FloatingPointError, match="train.lr"):
        trainer.fit(state, lambda step: batch(seed=step))


@pytest.mark.parametrize("kind, extra", [
    ("gpt", {}), ("mamba2", {"ssm_head_dim": 16, "d_state": 8, "chunk_size": 8}),
    ("mamba3", {"ssm_head_dim": 16, "d_state": 8, "chunk_size": 8}), ("hybrid", {"ssm_head_dim": 16, "d_state": 8,
                                                                                  "chunk_size": 8, "attn_every": 2}),
    ("vision", {"in_features": 12, "n_classes": 5}), ("char_rnn", {}),
])
def test_model_factory_builds_every_kind_and_each_trains_one_step(kind, extra):
    cfg = ModelConfig(kind=kind, vocab_size=64 if kind != "vision" else 0, d_model=32, n_layers=2, n_heads=4,
                      seq_len=16, **extra)
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    if kind == "vision":
        x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    else:
        x = torch.randint(0, 64, (2, 16))
        y = torch.roll(x, -1, 1)
    trainer = Trainer(TrainConfig(device="cpu", steps=1), build_method("exact"))
    state = trainer.setup(model)
    stats = trainer.train_step(state, (x, y))
    assert math.isfinite(stats.loss) and stats.grad_norm > 0


def test_unknown_model_kind_names_the_key():
    with pytest.raises(ConfigError, match="model.kind"):
        load_config(overrides=["model.kind='resnet'"])


def test_a_checkpoint_from_before_a_new_setting_resumes_at_its_default():
    from chainfree.checkpoint import config_diff

    current = load_config().to_dict()
    old = {section: dict(values) for section, values in current.items()}
    for key in ("compile", "compile_mode", "compile_scope", "activation_checkpoint", "grad_accum", "strategy"):
        del old["train"][key]
    assert config_diff(old, current) == []
    changed = load_config(overrides=["train.grad_accum=2"]).to_dict()
    assert config_diff(old, changed) == ["train.grad_accum: checkpoint None vs now 2"]


def test_evaluate_averages_the_val_windows_through_the_method_or_a_given_loss():
    from chainfree.training.trainer import evaluate

    class Windows:
        def batch(self, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            assert split == "val"
            return batch(4, seed=100 + i)

    torch.manual_seed(0)
    model = build_model(vision_cfg()).double()
    tc, seen = fp64_train(), []

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # e.g. the uncompiled model.forward
        seen.append(model.training)
        return model.forward(x, y)

    with torch.no_grad():
        expected = sum(float(model(*Windows().batch("val", i))) for i in range(3)) / 3
    assert evaluate(build_method("exact"), model, Windows(), 3, torch.device("cpu"), tc) == pytest.approx(expected)
    assert evaluate(build_method("exact"), model, Windows(), 3, torch.device("cpu"), tc, loss=forward) == pytest.approx(
        expected)
    assert seen == [False] * 3 and model.training  # eval mode inside, training mode restored
