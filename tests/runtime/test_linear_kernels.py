"""The CPU linear kernel choice: oneDNN prepacked or aten, measured per weight shape, and the native
kernel for calls of a few rows; the same results either way (fp32 tolerance; bf16: one rounding of
an fp32 sum), repacked when a weight changes, never under autograd."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from runtime import layers, native
from runtime.layers import NATIVE_ROWS, Linear, linear_kernel_choices, onednn_candidate, row_bucket, set_linear_kernel

needs_onednn = pytest.mark.skipif(not onednn_candidate(torch.float32), reason="no oneDNN prepacked linears on this CPU")
needs_kernel = pytest.mark.skipif(not native.available(torch.float32, torch.device("cpu")),
                                  reason="no C compiler here: the native kernels are not built")


@pytest.fixture(autouse=True)
def restore_mode():
    mode = layers._mode
    yield
    set_linear_kernel(mode)


@pytest.mark.parametrize("mode", ["auto", "aten", "onednn", "native"])
def test_every_kernel_matches_f_linear(mode):
    if mode == "onednn" and not onednn_candidate(torch.float32):
        pytest.skip("no oneDNN prepacked linears on this CPU")
    if mode == "native" and not native.available(torch.float32, torch.device("cpu")):
        pytest.skip("no C compiler here: the native kernels are not built")
    set_linear_kernel(mode)
    torch.manual_seed(0)
    lin = Linear(96, 160, bias=True)
    x = torch.randn(3, 5, 96)
    with torch.inference_mode():
        got = lin(x)
        rows = [lin(x[:1, :1]), lin(x.flatten(0, 1)[3:11])]  # 1 row, and a window of rows
    want = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rows[0], want[:1, :1])
    torch.testing.assert_close(rows[1], want.flatten(0, 1)[3:11])
    if mode == "aten":
        assert torch.equal(got, want)


@needs_onednn
def test_prepacked_rows_do_not_depend_on_the_other_rows():
    set_linear_kernel("onednn")
    lin = Linear(576, 1536, bias=False)
    x = torch.randn(33, 576)
    with torch.inference_mode():
        full = lin(x)
        assert all(torch.equal(lin(x[:m])[0], full[0]) for m in (1, 2, 7, 16, 33))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K, N", [(576, 960), (45, 7), (100, 130)])  # K past whole 32-element steps, N past tiles
def test_native_rows_are_one_rounding_of_the_exact_sum_and_do_not_depend_on_the_other_rows(dtype, K, N):
    set_linear_kernel("native")
    torch.manual_seed(K)
    lin = Linear(K, N, bias=True).to(dtype)
    x = torch.randn(NATIVE_ROWS[-1], K, dtype=dtype)
    with torch.inference_mode():
        full = lin(x)
        assert all(torch.equal(lin(x[:m]), full[:m]) for m in (1, 2, 3, 5, 7))  # rows in groups of 4, any count
        assert torch.equal(lin(x[None, 2:4]), full[None, 2:4])  # leading dims kept
    exact = (x.double() @ lin.weight.double().T + lin.bias.double())
    if dtype == torch.bfloat16:  # fp32 sums, one rounding to bf16
        torch.testing.assert_close(full.double(), exact, rtol=2 ** -7, atol=1e-3)
    else:
        torch.testing.assert_close(full.double(), exact, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # more rows than the native kernel takes: aten, the same sums to tolerance
        torch.testing.assert_close(lin(torch.cat([x, x])).double()[:len(x)], full.double(), rtol=2 ** -7, atol=1e-2)


def test_kernels_are_timed_from_memory_over_copies_of_the_weight_in_turn():
    """The choice times each kernel on copies of the weight that together pass the last-level cache
    (COLD_BYTES), as a decode step reads it, and the candidates take turns within every repeat."""
    w = torch.randn(576, 576, dtype=torch.bfloat16)
    copies = layers._cold_copies(w)
    assert copies[0] is w and len(copies) == min(layers.COLD_COPIES, -(-layers.COLD_BYTES // (576 * 576 * 2)))
    assert all(torch.equal(c, w) and c.data_ptr() != w.data_ptr() for c in copies[1:])
    assert len(layers._cold_copies(torch.randn(4, 4))) == layers.COLD_COPIES  # a small weight: capped
    order = []
    times = layers.best_in_turn({"a": lambda i: order.append(("a", i)), "b": lambda i: order.append(("b", i))}, 3, repeats=2)
    assert order == [(k, i) for _ in range(3) for k in "ab" for i in range(3)]  # a warm-up round, then 2 timed
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())


@needs_kernel
def test_auto_takes_native_only_up_to_the_rows_where_it_won():
    set_linear_kernel("auto")
    lin = Linear(576, 960, bias=False).to(torch.bfloat16)
    with torch.inference_mode():
        lin(torch.randn(1, 576, dtype=torch.bfloat16))
    (choice,) = [c for c in linear_kernel_choices() if c["shape"] == [960, 576] and c["dtype"] == "torch.bfloat16"]
    other = choice[f"{choice['kernel']}_us_at_native_rows"]
    won = [mine < 0.95 * theirs for mine, theirs in zip(choice["native_us"], other)]
    assert choice["native_rows"] == ([0, *NATIVE_ROWS][won.index(False)] if False in won else NATIVE_ROWS[-1])
    calls = []
    real = layers._native
    layers._native = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    try:
        with torch.inference_mode():
            for rows in (1, 4, 16, 40):
                lin(torch.randn(rows, 576, dtype=torch.bfloat16))
    finally:
        layers._native = real
    assert calls == [r for r in (1, 4, 16, 40) if r <= choice["native_rows"]]


@needs_kernel
def test_a_weight_the_native_kernel_cannot_read_in_place_keeps_the_other_kernel():
    """The choice is made per weight shape; a non-contiguous weight of a shape that chose native does not take it."""
    set_linear_kernel("auto")
    a, b = Linear(64, 48, bias=False), Linear(64, 48, bias=False)
    b.weight = torch.nn.Parameter(torch.randn(64, 48).T, requires_grad=False)  # (48, 64), not contiguous
    x = torch.randn(1, 64)
    with torch.inference_mode():
        a(x)
        assert layers._kernels(b)[1] == 0
        torch.testing.assert_close(b(x), F.linear(x, b.weight))


def test_row_buckets_are_few_and_never_fewer_rows():
    buckets = [row_bucket(m) for m in range(1, 4097)]
    assert all(b >= m for b, m in zip(buckets, range(1, 4097)))
    assert buckets[:16] == list(range(1, 17))  # decode batches run unpadded
    assert len(set(buckets)) <= 16 + 7 + 8 * 5  # a bounded number of oneDNN primitives per weight shape
    assert max(b / m for b, m in zip(buckets, range(1, 4097)) if m > 128) <= 1.125


@needs_onednn
def test_padded_row_counts_give_the_rows_of_f_linear():
    set_linear_kernel("onednn")
    lin = Linear(64, 48, bias=True)
    for shape in ((37, 64), (2, 100, 64), (1, 129, 64)):  # padded to 48, 224 and 160 rows
        x = torch.randn(shape)
        with torch.inference_mode():
            got = lin(x)
        assert got.shape == (*shape[:-1], 48)
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias))


@needs_onednn
def test_a_changed_weight_is_repacked():
    set_linear_kernel("onednn")
    lin = Linear(64, 64, bias=False)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: the version counter moves
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), 2.0 * before)
    lin.load_state_dict({"weight": torch.zeros(64, 64)})
    with torch.inference_mode():
        assert lin(x).abs().max() == 0


def test_autograd_takes_f_linear_and_gets_gradients():
    set_linear_kernel("onednn" if onednn_candidate(torch.float32) else "aten")
    lin = Linear(32, 8)
    lin(torch.randn(2, 32)).sum().backward()
    assert lin.weight.grad is not None and not layers._packed.get(lin)


def test_auto_measures_each_shape_once_and_says_what_it_chose():
    set_linear_kernel("auto")
    a, b = Linear(48, 80, bias=False), Linear(48, 80, bias=False)
    with torch.inference_mode():
        a(torch.randn(2, 48))
        b(torch.randn(2, 48))
    choices = [c for c in linear_kernel_choices() if c["shape"] == [80, 48]]
    if not onednn_candidate(torch.float32):
        assert choices == []  # nothing to choose from: aten
        return
    (choice,) = choices  # measured once, for both layers
    assert choice["kernel"] in ("aten", "onednn") and choice["aten_us"] > 0 and choice["onednn_us"] > 0


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="must be one of auto, aten, onednn, native"):
        set_linear_kernel("mkl")


def test_an_unknown_kernel_in_the_environment_fails_at_start_up_with_the_names():
    env = {**os.environ, "PONDER_CPU_LINEAR": "mkl"}
    run = subprocess.run([sys.executable, "-c", "import runtime.layers"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "PONDER_CPU_LINEAR: linear kernel 'mkl' must be one of auto, aten, onednn, native" in run.stderr
