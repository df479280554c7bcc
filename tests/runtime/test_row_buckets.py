"""Activations with room for their row bucket: a linear reads them at the bucket without a copy, and the
rows past a tensor's own never reach its output, whatever they hold."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from runtime import layers, native
from runtime.layers import Linear, set_linear_kernel
from runtime.norm_act import rms_norm, silu_mul
from runtime.row_buckets import empty_rows, row_bucket, with_room


class Ops(TorchDispatchMode):
    """The names of the ATen ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def restore_mode():
    mode = layers._mode
    yield
    set_linear_kernel(mode)


def test_empty_rows_leave_room_for_the_bucket_and_with_room_reads_it_in_place():
    x = empty_rows((2, 67, 8), torch.zeros(1, dtype=torch.bfloat16))  # 134 rows, bucket 144
    assert x.shape == (2, 67, 8) and x.dtype == torch.bfloat16 and x.is_contiguous()
    padded = with_room(x, row_bucket(134))
    assert padded.shape == (144, 8) and padded.data_ptr() == x.data_ptr()
    assert with_room(torch.zeros(134, 8), 144) is None  # no room
    assert with_room(torch.zeros(8, 200).t(), 144) is None  # not contiguous
    assert empty_rows((16, 8), x).untyped_storage().nbytes() == 16 * 8 * 2  # no bucket past 16 rows: no room


@pytest.mark.parametrize("mode", ["aten", "onednn", "auto"])
def test_a_linear_reads_an_input_with_room_without_a_copy_and_other_rows_never_leak(mode):
    if mode == "onednn" and not layers.onednn_candidate(torch.bfloat16):
        pytest.skip("no oneDNN bf16 prepacked linears on this CPU")
    set_linear_kernel(mode)
    torch.manual_seed(0)
    lin = Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(134, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = lin(x.clone())  # no room: padded in a copy
        roomy = empty_rows(x.shape, x)
        roomy.copy_(x)
        with Ops() as ops:
            got = lin(roomy)
        # a leading slice of a larger tensor whose next rows hold NaN: read as the padding, and dropped
        big = torch.full((300, 64), float("nan"), dtype=torch.bfloat16)
        big[:134] = x
        sliced = lin(big[:134])
    assert not [n for n in ops.names if "pad" in n or "copy" in n or "fill" in n]
    assert torch.equal(got, want) and torch.equal(sliced, want)  # the same kernel on the same rows
    torch.testing.assert_close(want, F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)


def test_the_native_kernels_that_feed_linears_give_room():
    x = torch.randn(134, 64, dtype=torch.bfloat16)
    if not native.available(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no C compiler here: the native kernels are not built")
    with torch.inference_mode():
        normed = rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5)[1]
        act = silu_mul(torch.randn(134, 96, dtype=torch.bfloat16))
    assert with_room(normed, 144) is not None and with_room(act, 144) is not None


def test_an_engine_step_feeds_every_linear_an_input_with_room(monkeypatch):
    """Prompts of 18 rows in all (bucket 32) through the executor in bf16: every linear that pads reads
    its input in place (the norms', silu_mul's and the attention outputs' rows), none in a copy."""
    from runtime.config import ModelConfig
    from runtime.engine.executor import Executor, SeqInput
    from runtime.engine.kv_cache import PagedKVCache
    from runtime.model import PonderModel

    if not native.available(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no C compiler here: the native kernels are not built")
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("tiny", n_pool=2, max_depth=2)).eval().to(torch.bfloat16)
    cache = PagedKVCache(model.cfg, num_blocks=16, block_size=4, device=torch.device("cpu"), dtype=torch.bfloat16)
    executor = Executor(model, cache)
    reads = []
    monkeypatch.setattr(layers, "with_room", lambda x, rows: reads.append(with_room(x, rows)) or reads[-1])
    executor.run([SeqInput(list(range(1, 10)), 0, [0, 1, 2]), SeqInput(list(range(2, 11)), 0, [3, 4, 5])])
    assert reads and all(r is not None for r in reads)
