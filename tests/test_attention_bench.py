"""CPU checks of the attention / step benchmark helpers (the timed runs themselves need a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chainfree.bench.attention import (
    attention_flops,
    classify_kernels,
    run_attention_bench,
    run_step_bench,
    zero_backward_attention,
)


def test_backend_classification_from_kernel_names():
    assert classify_kernels(["cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0"]) == "cudnn"
    assert classify_kernels(["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"]) == "flash"
    assert classify_kernels(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == "efficient"
    assert classify_kernels(["at::native::vectorized_elementwise_kernel", "ampere_bf16_s16816gemm"]) == "math"


def test_attention_flops():
    assert attention_flops(1024, 1024, 64, 8, False) == 4 * 1024 * 1024 * 64 * 8
    assert attention_flops(1024, 1024, 64, 8, True) == 2 * 1024 * 1024 * 64 * 8


def test_zero_backward_attention_is_sdpa_forward_with_zero_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    out = zero_backward_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(gr.abs().max() == 0 for gr in grads)
    with pytest.raises(ValueError, match="is_causal"):
        zero_backward_attention(q, k, v, scale=0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_benches_refuse_without_cuda(tmp_path):
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        run_attention_bench([256], [64], [8.0], out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        run_step_bench([256], [64], out_dir=tmp_path)
