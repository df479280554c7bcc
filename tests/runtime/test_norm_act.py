"""The native RMSNorm and silu(gate) * up (runtime/csrc/norm_act.c) and the exit head
(csrc/exit_head.c) give torch's results (bf16: the same bits but for rare one-step differences),
refuse what does not fit, and the layers take them only at inference on CPU, so training still
differentiates through torch's ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime import native
from runtime.config import ModelConfig
from runtime.layers import Block, RMSNorm, SwiGLU
from runtime.model import ExitHead
from runtime.norm_act import exit_scores, native_rows, rms_norm, silu_mul

needs_kernel = pytest.mark.skipif(not native.available(torch.float32, torch.device("cpu")),
                                  reason="no C compiler here: the native kernels are not built")

ROWS = [1, 16, 1024]  # 1024 rows of 576 run on several threads (PARALLEL_MIN)


def assert_like_torch(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16:
        # fp32 sums in another order, or exp one fp32 bit apart, rarely round to the next bf16 step;
        # silu_mul rounds twice (silu, then the product), so a step of silu's may become two of the product's
        assert (got != want).float().mean() < 1e-3
        torch.testing.assert_close(got, want, atol=1e-35, rtol=2 ** -6)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", ROWS)
def test_rms_norm_is_torchs_with_and_without_a_residual(dtype, n):
    torch.manual_seed(n)
    x, r = torch.randn(n, 576, dtype=dtype) * 3, torch.randn(n, 576, dtype=dtype)
    w = torch.randn(576, dtype=dtype)
    h, out = rms_norm(x, w, 1e-5)
    assert h is x
    assert_like_torch(out, F.rms_norm(x, (576,), w, 1e-5))
    h, out = rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(h, x + r)  # the sum rounded as torch's add
    assert_like_torch(out, F.rms_norm(x + r, (576,), w, 1e-5))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", ROWS)
def test_silu_mul_is_torchs(dtype, n):
    torch.manual_seed(n)
    gate_up = torch.randn(n, 2 * 1536, dtype=dtype) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamp, and zero of either sign
    gate, up = gate_up.chunk(2, dim=-1)
    assert_like_torch(silu_mul(gate_up), F.silu(gate) * up)


@needs_kernel
def test_bf16_rows_past_whole_vectors_and_denormal_results_round_as_torchs():
    """Widths that are not a multiple of 16 (the vector kernels' tails), and results below bf16's
    smallest normal, which the CPU's bf16 conversion would flush to zero and torch keeps."""
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 2 * 583) * 4).to(torch.bfloat16)
    gate_up[0, :3] = torch.tensor([-85.0, -86.0, -84.0])  # silu ~ -1e-36 .. -2e-37 times up: denormal products
    gate_up[0, 583:586] = 1e-4
    gate, up = gate_up.chunk(2, dim=-1)
    got, want = silu_mul(gate_up), F.silu(gate) * up
    assert want[0, :3].abs().max() < torch.finfo(torch.float32).tiny and (want[0, :3] != 0).all()
    assert torch.equal(got[0, :3], want[0, :3])
    assert_like_torch(got, want)
    x = (torch.randn(3, 583) * 3).to(torch.bfloat16)
    w = torch.randn(583).to(torch.bfloat16)
    w[:3] = 1e-38  # outputs ~1e-38 times a normed value: denormal
    out = rms_norm(x, w, 1e-5)[1]
    want = F.rms_norm(x, (583,), w, 1e-5)
    assert (want[:, :3].abs() < torch.finfo(torch.float32).tiny).any()
    assert torch.equal(out[:, :3], want[:, :3])
    assert_like_torch(out, want)


@needs_kernel
def test_rows_keep_their_leading_shape_and_strided_inputs_are_read_right():
    x = torch.randn(6, 40)[:, :32].reshape(2, 3, 32)  # a copy: reshape of a strided slice
    w = torch.randn(32)
    assert_like_torch(rms_norm(x, w, 1e-6)[1], F.rms_norm(x, (32,), w, 1e-6))
    gate_up = torch.randn(2, 3, 20).transpose(0, 1)  # not contiguous
    gate, up = gate_up.chunk(2, dim=-1)
    assert_like_torch(silu_mul(gate_up), F.silu(gate) * up)


@needs_kernel
def test_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        rms_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        rms_norm(torch.randn(2, 8), torch.randn(8), 1e-5, residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="gate and up"):
        silu_mul(torch.randn(2, 7))


@needs_kernel
def test_layers_take_the_kernels_at_inference_only():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64)
    torch.manual_seed(0)
    block, x, delta = Block(cfg), torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        block.mlp_norm.weight.normal_()
    expected = block.feedforward(x + delta).detach()  # autograd on: torch's ops
    assert not native_rows(x, torch.float32)
    with torch.inference_mode():
        assert native_rows(x, torch.float32) and not native_rows(x, torch.bfloat16)
        block.fuse()
        got = block.feedforward(x, delta)  # the add in the norm's pass, then silu_mul on the fused gate/up
    assert_like_torch(got, expected)
    norm, mlp = RMSNorm(32, 1e-5), SwiGLU(cfg)
    y = mlp(norm(x.requires_grad_()))
    y.sum().backward()  # training differentiates through torch's ops
    assert x.grad is not None and norm.weight.grad is not None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 100])  # 100 rows: torch's ops in the module (EXIT_HEAD_MAX_ROWS)
@pytest.mark.parametrize("step_bias", [False, True])
def test_exit_head_scores_are_torchs(dtype, n, step_bias):
    cfg = ModelConfig(d_model=48, n_heads=4, n_kv_heads=2, vocab_size=64, exit_hidden=16, max_depth=4,
                      exit_step_bias=step_bias)
    torch.manual_seed(n)
    head = ExitHead(cfg).to(dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    x = torch.randn(n, 48, dtype=dtype) * 2
    with torch.inference_mode():
        assert native_rows(x, dtype)
        got = head(x, 2)
        direct = exit_scores(x, head.norm.weight, head.norm.eps, head.fc.weight, head.fc.bias,
                             head.step_bias.weight[2] if step_bias else None, head.out.weight, head.out.bias)
        want = head.out(F.gelu(head.fc(head.norm(x)) + (head.step_bias.weight[2] if step_bias else 0)))
        want = F.softplus(want).squeeze(-1)  # the same ops, one by one
    assert_like_torch(got, want)
    assert_like_torch(direct, want)  # the kernel itself, threaded at 100 rows


@needs_kernel
def test_exit_scores_refuses_what_does_not_fit():
    x, norm, fc, fc_b, out, out_b = (torch.randn(2, 8), torch.ones(8), torch.randn(4, 8), torch.randn(4),
                                     torch.randn(1, 4), torch.randn(1))
    with pytest.raises(ValueError, match="do not fit"):
        exit_scores(x, norm, 1e-5, torch.randn(4, 7), fc_b, None, out, out_b)
    with pytest.raises(ValueError, match="do not fit"):
        exit_scores(x, norm, 1e-5, fc, fc_b, torch.randn(3), out, out_b)
    with pytest.raises(ValueError, match="do not fit"):
        exit_scores(x.bfloat16(), norm, 1e-5, fc, fc_b, None, out, out_b)
    with pytest.raises(ValueError, match="past the kernel"):
        exit_scores(torch.randn(1, 9000), torch.ones(9000), 1e-5, torch.randn(1, 9000), torch.randn(1), None,
                    torch.randn(1, 1), torch.randn(1))


@needs_kernel
def test_exit_head_follows_its_parameters_after_they_change():
    """The module keeps its kernel call between calls: a parameter changed in place or replaced is read."""
    cfg = ModelConfig(d_model=48, n_heads=4, n_kv_heads=2, vocab_size=64, exit_hidden=16, max_depth=4,
                      exit_step_bias=True)
    torch.manual_seed(3)
    head = ExitHead(cfg)
    x = torch.randn(4, 48)

    def torchs() -> Tensor:
        hidden = head.fc(head.norm(x)) + head.step_bias.weight[1]
        return F.softplus(head.out(F.gelu(hidden))).squeeze(-1)

    with torch.inference_mode():
        before = head(x, 1)
    with torch.no_grad():
        head.fc.weight.mul_(3)
    with torch.inference_mode():
        changed = head(x, 1)
        assert_like_torch(changed, torchs())
    assert not torch.equal(before, changed)
    head.out.bias = torch.nn.Parameter(head.out.bias.detach() + 5)
    with torch.inference_mode():
        assert_like_torch(head(x, 1), torchs())
