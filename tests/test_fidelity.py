"""bench.fidelity: exact is exactly exact; a known-noise estimator's variance, bias floor and variance
increase are recovered within chi-square tolerances (derived below, not tuned)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chainfree.bench.fidelity import measure_fidelity, param_group
from chainfree.config import ModelConfig
from chainfree.errors import ConfigError
from chainfree.methods import build_method
from chainfree.methods.base import Method, StepStats
from chainfree.models.lm import LanguageModel

Z = 4.0  # tolerance in standard deviations: two-sided normal tail 6e-5 per check


class NoisyExact(Method):
    """Exact gradient + iid N(0, sigma^2) per coordinate (+ optional relative bias delta*g): known truth."""

    name = "noisy_exact"

    def __init__(self, sigma: float, delta: float = 0.0) -> None:
        super().__init__()
        self.sigma, self.delta = sigma, delta

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        loss = model(inputs, targets)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1 + self.delta).add_(torch.randn_like(p.grad), alpha=self.sigma)
        return StepStats(loss=float(loss.detach()), tokens=targets.numel())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a loaded 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=48, seq_len=12, d_model=32, n_layers=2, n_heads=2)
    model = LanguageModel(cfg).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 48, (3, 12), generator=gen), torch.randint(0, 48, (3, 12), generator=gen))
               for _ in range(5)]
    return model, batches


def test_param_group():
    assert param_group("blocks.3.attn.qkv_proj.weight") == "blocks.3.attn"
    assert param_group("embed.weight") == "embed"
    assert param_group("lm.blocks.0.mlp.up.bias") == "lm.blocks.0.mlp"
    assert param_group("enc.2.net.0.weight") == "enc.2"
    assert param_group("alpha.0") == "alpha"


def test_exact_is_exactly_zero(setup):
    model, batches = setup
    rep = measure_fidelity(model, build_method("exact"), batches, k=3)
    for row in rep.rows("groups") + rep.rows("kinds"):
        for key in ("bias", "variance", "bias_se", "variance_se", "variance_increase", "variance_increase_noise",
                    "variance_increase_bias", "variance_increase_se"):
            assert row[key] == 0.0, (row["group"], key, row[key])
        assert abs(row["cosine"] - 1) < 1e-12 and abs(row["norm_ratio"] - 1) < 1e-12
    assert rep.overall["minibatch_variance"] > 0
    assert rep.reference == "copy"


def test_known_noise_recovered(setup):
    """Gaussian noise sigma per coordinate, p coordinates, M batches, K estimates (g_b fixed):
    Σ_b tr Σ̂_b ~ sigma² χ²_{M p (K-1)} / (K-1)  -> relative sd sqrt(2 / (M p (K-1)));
    Σ_b ‖ḡ_b - g_b‖² ~ sigma²/K χ²_{M p}          -> relative sd sqrt(2 / (M p))."""
    model, batches = setup
    sigma, k = 3e-3, 4
    m = len(batches)
    rep = measure_fidelity(model, NoisyExact(sigma), batches, k=k, seed=3)
    for row in rep.rows("groups"):
        p = row["numel"]
        gg_total = row["grad_norm"] ** 2 * m
        truth_var = m * p * sigma**2 / gg_total
        tol = Z * math.sqrt(2 / (m * p * (k - 1)))
        assert abs(row["variance"] / truth_var - 1) < tol, row
        truth_se2 = truth_var / k  # E bias² of an unbiased estimator = the true bias_se²
        assert abs(row["bias_se"] ** 2 / truth_se2 - 1) < tol, row
        assert abs(row["bias"] ** 2 / truth_se2 - 1) < Z * math.sqrt(2 / (m * p)), row
        # the reported standard error of the variance (jackknife) is of the right size: for Gaussian noise
        # the exact sd is truth_var * sqrt(2 / (M p (K-1))); a jackknife from K=4 values is itself noisy, so
        # only the order of magnitude is checked (factor 4 either way)
        exact_sd = truth_var * math.sqrt(2 / (m * p * (k - 1)))
        assert exact_sd / 4 < row["variance_se"] < 4 * exact_sd, row
    # variance increase: W = mean_b tr Σ̂_b estimates p sigma² (relative sd sqrt(2/(M p (K-1))));
    # S_g (exact between-batch variance) is reported as minibatch_variance * mean ‖g_b‖²
    o = rep.overall
    p = o["numel"]
    s_g = o["minibatch_variance"] * o["grad_norm"] ** 2
    w = o["variance_increase_noise"] * s_g
    assert abs(w / (p * sigma**2) - 1) < Z * math.sqrt(2 / (m * p * (k - 1)))
    # the between-batch term is zero in expectation: its numerator S_m - W/K - S_g has variance
    # 4 S_g sigma²/(K (M-1)) (cross term) + 2 p sigma⁴/(K² (M-1)) + Var(W)/K², Var(W) = 2 p sigma⁴/(M (K-1))
    var_num = (4 * s_g * sigma**2 / (k * (m - 1)) + 2 * p * sigma**4 / (k**2 * (m - 1))
               + 2 * p * sigma**4 / (m * (k - 1)) / k**2)
    assert abs(o["variance_increase_bias"] * s_g) < Z * math.sqrt(var_num)
    assert math.isclose(o["variance_increase"], o["variance_increase_noise"] + o["variance_increase_bias"])
    assert o["cosine"] < 1


def test_deterministic_bias(setup):
    """ĝ = (1 + delta) g: bias = |delta|, norm ratio 1 + delta, cosine 1, zero variance."""
    model, batches = setup
    delta = 0.25
    rep = measure_fidelity(model, NoisyExact(0.0, delta), batches[:2], k=2)
    o = rep.overall
    assert abs(o["bias"] - delta) < 1e-12 and abs(o["norm_ratio"] - 1 - delta) < 1e-12
    assert o["variance"] == 0.0 and abs(o["cosine"] - 1) < 1e-12
    assert abs(o["bias_corrected"] - delta) < 1e-12


def test_biased_noisy_corrected(setup):
    """bias_corrected² = bias² - bias_se² is unbiased for delta²: with e_b the noise mean (cov sigma²/K I),
    Var(Σ_b ‖delta g_b + e_b‖²) = 4 delta² sigma²/K Σ‖g_b‖² + 2 M p sigma⁴/K², plus Var of the subtracted
    noise floor 2 M p sigma⁴/(K² (K-1))."""
    model, batches = setup
    sigma, delta, k = 2e-3, 0.05, 4
    m = len(batches)
    o = measure_fidelity(model, NoisyExact(sigma, delta), batches, k=k, seed=5).overall
    p, gg = o["numel"], o["grad_norm"] ** 2 * m
    var = 4 * delta**2 * sigma**2 / k * gg + 2 * m * p * sigma**4 / k**2 * (1 + 1 / (k - 1))
    assert abs(o["bias_corrected"] ** 2 * gg - delta**2 * gg) < Z * math.sqrt(var)


def test_copy_reference_for_layer_swaps_and_errors(setup):
    model, batches = setup
    # BASIS at R >= rows, shrink 0, no scalars is autograd up to rounding (a signed permutation): the copy
    # reference (plain autograd, same weights) sees no bias
    params = {"rank": 64, "shrink": 0.0, "scalars": False}
    rep = measure_fidelity(model, build_method("basis", params), batches[:2], k=2)
    assert rep.reference == "copy"
    assert rep.overall["bias"] < 1e-12 and rep.overall["variance"] < 1e-20

    class Renames(Method):
        name = "renames"

        def prepare(self, model):
            return nn.ModuleDict({"wrapped": model})

    with pytest.raises(ConfigError, match="reference='self'"):
        measure_fidelity(model, Renames(), batches[:1], k=1, reference="copy")
    with pytest.raises(ConfigError, match="k"):
        measure_fidelity(model, build_method("exact"), batches[:1], k=0)
