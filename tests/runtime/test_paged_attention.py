"""The paged decode kernel (runtime/csrc/paged_attention.c) gives SDPA's outputs over each row's
context, read in place through shuffled block tables; it refuses what it cannot run; and without a
compiler the engine keeps the torch kernels."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from runtime import native
from runtime.layers import apply_rope, rope_tables
from runtime.paged_attention import available, paged_decode, rope_and_cache

needs_kernel = pytest.mark.skipif(not available(torch.float32, torch.device("cpu")),
                                  reason="no C compiler here: the paged kernel is not built")


def paged_cache(num_blocks, block_size, Hkv, D, dtype):
    return (torch.randn(num_blocks * block_size, Hkv, D, dtype=dtype) for _ in range(2))


def reference(q, k, v, tables, ctx_lens, block_size):
    """Each row over its first ctx_lens[r] positions, gathered by hand, in float64."""
    out = []
    for r, n in enumerate(ctx_lens.tolist()):
        pos = [tables[r, t // block_size].item() * block_size + t % block_size for t in range(n)]
        kr, vr = (c[pos].transpose(0, 1).double() for c in (k, v))  # (Hkv, n, D)
        out.append(F.scaled_dot_product_attention(q[r, :, None].double(), kr, vr, enable_gqa=True)[:, 0])
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H, Hkv, D", [(9, 3, 64), (4, 2, 128), (4, 4, 32), (4, 4, 16), (8, 1, 8)])
@pytest.mark.parametrize("block_size", [16, 4])
def test_matches_sdpa_over_each_rows_context_in_place(dtype, tol, H, Hkv, D, block_size):
    torch.manual_seed(0)
    k, v = paged_cache(64, block_size, Hkv, D, dtype)
    ctx_lens = torch.tensor([1, block_size, block_size + 1, 5 * block_size - 3, 40])
    width = -(-int(ctx_lens.max()) // block_size)
    tables = torch.randperm(64)[: len(ctx_lens) * width].view(len(ctx_lens), width)  # no two rows share a block
    q = torch.randn(len(ctx_lens), H, D, dtype=dtype)
    out = paged_decode(q, k, v, tables, ctx_lens, block_size)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, ctx_lens, block_size), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 compiler flags")
def test_portable_build_matches_sdpa_too(monkeypatch, tmp_path):
    """Built without AVX-512 BF16 (as on an AVX2-only CPU), the portable loops serve the head dims that
    take intrinsics elsewhere (64 and 128), with the same results."""
    monkeypatch.setenv("PONDER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-mno-avx512bf16"))
    native.library.cache_clear()
    try:
        for H, Hkv, D in [(9, 3, 64), (4, 2, 128)]:
            torch.manual_seed(2)
            k, v = paged_cache(16, 16, Hkv, D, torch.bfloat16)
            tables, ctx_lens = torch.randperm(16)[:12].view(3, 4), torch.tensor([7, 33, 64])
            q = torch.randn(3, H, D, dtype=torch.bfloat16)
            torch.testing.assert_close(paged_decode(q, k, v, tables, ctx_lens, 16).double(),
                                       reference(q, k, v, tables, ctx_lens, 16), atol=2e-2, rtol=2e-2)
    finally:
        native.library.cache_clear()  # the next test loads the native build again
    assert len(list(tmp_path.glob("ponder-kernels-*.so"))) == 1


@needs_kernel
def test_rows_of_one_sequence_see_growing_prefixes_of_one_table():
    """The rows of a mixed step's decode rows may share a table: each sees up to its own position."""
    torch.manual_seed(1)
    k, v = paged_cache(8, 4, 2, 8, torch.float32)
    tables = torch.tensor([[5, 2, 7]] * 3)
    ctx_lens = torch.tensor([3, 9, 12])
    q = torch.randn(3, 4, 8)
    torch.testing.assert_close(paged_decode(q, k, v, tables, ctx_lens, 4).double(),
                               reference(q, k, v, tables, ctx_lens, 4), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_refuses_what_it_cannot_run():
    k, v = paged_cache(4, 4, 2, 8, torch.float32)
    tables, ctx = torch.zeros(1, 1, dtype=torch.long), torch.tensor([2])
    with pytest.raises(ValueError, match="dtype"):
        paged_decode(torch.randn(1, 4, 8, dtype=torch.bfloat16), k, v, tables, ctx, 4)
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode(torch.randn(1, 3, 8), k, v, tables, ctx, 4)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="outside tables"):
        paged_decode(torch.randn(1, 4, 8), k, v, tables, torch.tensor([5]), 4)  # past its table's one block
    with pytest.raises(ValueError, match="outside tables"):
        paged_decode(torch.randn(1, 4, 8), k, v, torch.tensor([[4]]), ctx, 4)  # block 4 of a 4-block cache
    with pytest.raises(RuntimeError, match="paged_decode failed"):
        paged_decode(torch.randn(1, 4, 8), k, v, tables, ctx, 3)  # block size not a power of two
    with pytest.raises(RuntimeError, match="paged_decode failed"):
        big = torch.randn(16, 2, 512)
        paged_decode(torch.randn(1, 4, 512), big, big, tables, ctx, 4)  # head dim past 256


@pytest.mark.parametrize("env", [{"PONDER_NATIVE_KERNELS": "0"}, {"CC": "/nonexistent/cc"}])
def test_without_the_kernel_the_engine_keeps_torch_kernels_and_says_so(env, tmp_path):
    """Switched off, or no compiler: not available, a log line says why, and decode still runs."""
    script = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
              "from runtime import attention, paged_attention\n"
              "assert not paged_attention.available(torch.float32, torch.device('cpu'))\n"
              "q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 24, 8)\n"
              "out = attention.attend(q, k, k, torch.ones(2, 1, 24, dtype=torch.bool))\n"
              "assert out.shape == q.shape and 'paged' not in attention.attention_kernel_choices()[0]['kernels']\n")
    run_env = {**os.environ, "PONDER_KERNEL_CACHE": str(tmp_path), **env}
    result = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch kernels" in result.stderr


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 300])  # 300 rows of 15 heads of 64 run on several threads (PARALLEL_MIN)
def test_rope_and_cache_is_apply_rope_and_the_cache_write_bit_for_bit(dtype, n):
    torch.manual_seed(3)
    H, Hkv, D, positions = 9, 3, 64, 2 * n + 40
    qkv = torch.randn(n, (H + 2 * Hkv) * D, dtype=dtype)
    qkv[0, :40] = 1e-38  # products below the smallest normal: rounded as torch rounds them, not flushed
    cos, sin = (t.to(dtype) for t in rope_tables(torch.randint(0, 2000, (n,)), D, 10000.0))
    k_cache, v_cache = torch.zeros(positions, Hkv, D, dtype=dtype), torch.zeros(positions, Hkv, D, dtype=dtype)
    index = torch.randperm(positions)[:n]
    q = rope_and_cache(qkv, H, Hkv, cos, sin, k_cache, v_cache, index)
    heads = qkv.view(n, H + 2 * Hkv, D)
    qk = apply_rope(heads[:, : H + Hkv], cos[:, None], sin[:, None])  # what Attention.project_rows runs
    assert torch.equal(q, qk[:, :H])
    assert torch.equal(k_cache[index], qk[:, H:]) and torch.equal(v_cache[index], heads[:, H + Hkv :])
    untouched = torch.ones(positions, dtype=torch.bool)
    untouched[index] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@needs_kernel
def test_rope_and_cache_refuses_what_does_not_fit():
    qkv, cos = torch.randn(2, 15 * 8), torch.randn(2, 8)
    cache = torch.zeros(4, 3, 8)
    with pytest.raises(ValueError, match="outside"):
        rope_and_cache(qkv, 9, 3, cos, cos, cache, cache.clone(), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="do not fit"):
        rope_and_cache(qkv, 8, 3, cos, cos, cache, cache.clone(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one dtype"):
        rope_and_cache(qkv.bfloat16(), 9, 3, cos, cos, cache, cache.clone(), torch.tensor([0, 1]))
    assert not cache.any()
