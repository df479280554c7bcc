"""The CPU attention kernels give SDPA's outputs in every case the engine runs (a padded decode step,
a chunk after cached context, a subset of its rows, a causal prompt over several blocks), and the
auto mode measures and records its choice; grouped GEMMs run only a few GEMM shapes, whatever the
batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime import attention, native
from runtime.flash_attention import flash_attention, flash_available, flash_paged_attention, flash_unit
from runtime.attention import (CAUSAL_BLOCK, attend, attention_kernel_choices,
                               causal_softmax_, grouped_attention, grouped_decode, set_attention_kernel,
                               warm_up_attention)

needs_kernel = pytest.mark.skipif(not native.available(torch.float32, torch.device("cpu")),
                                  reason="no C compiler here: the native kernels are not built")
needs_flash = pytest.mark.skipif(not flash_available(torch.bfloat16, 64), reason="neither AMX-BF16 nor AVX-512 BF16 here")


@pytest.fixture(autouse=True)
def restore_mode():
    mode = attention._mode
    yield
    set_attention_kernel(mode)


def cache_layout(R, L, Hkv, D, dtype):
    """k or v as the paged cache gathers it: (R, Hkv, L, D), a transposed view of (R, L, Hkv, D)."""
    return torch.randn(R, L, Hkv, D, dtype=dtype).transpose(1, 2)


def reference(q, k, v, mask, causal):
    M, L = q.shape[2], k.shape[2]
    if causal:  # the queries are the last M positions, each over the keys up to itself
        mask = (torch.arange(L)[None, :] <= torch.arange(L - M, L)[:, None])[None]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=None if mask is None else mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("H, Hkv", [(9, 3), (4, 4)])
def test_grouped_gemms_match_sdpa_on_causal_prompts(dtype, tol, H, Hkv):
    torch.manual_seed(0)
    D = 16
    for T in (5, CAUSAL_BLOCK, 2 * CAUSAL_BLOCK + 37):  # under one block, exactly one, and past two
        q = torch.randn(1, H, T, D, dtype=dtype)
        k, v = cache_layout(1, T, Hkv, D, dtype), cache_layout(1, T, Hkv, D, dtype)
        torch.testing.assert_close(grouped_attention(q, k, v).double(), reference(q, k, v, None, True),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("inference", [False, True])  # torch's mask and softmax, and the native pass
def test_grouped_gemms_match_sdpa_on_chunks_after_cached_context(dtype, tol, inference):
    """Chunks whose queries start inside a block, on a block boundary, and span several blocks."""
    torch.manual_seed(0)
    B = CAUSAL_BLOCK
    for start, M in [(0, 2 * B + 37), (3, 5), (B - 1, 1), (B, B), (100, 60), (2 * B + 17, B + 40)]:
        q = torch.randn(2, 9, M, 16, dtype=dtype)
        k, v = cache_layout(2, start + M, 3, 16, dtype), cache_layout(2, start + M, 3, 16, dtype)
        with torch.inference_mode(inference):
            out = grouped_attention(q, k, v)
        torch.testing.assert_close(out.double(), reference(q, k, v, None, True), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [0, 5, 300])  # the block's first query position: keys past it are masked
def test_native_causal_softmax_is_torchs_mask_and_softmax(dtype, first):
    torch.manual_seed(first)
    B, keys = 8, first + 8 + 3  # keys past the block's end too (a padded chunk's): masked for every query
    scores = torch.randn(2, 3, 2 * B, keys, dtype=dtype) * 4  # two query heads of one KV head, B queries each
    sees = torch.arange(keys) <= (first + torch.arange(2 * B) % B)[:, None]
    want = scores.masked_fill(~sees, -torch.inf).softmax(-1)
    got = causal_softmax_(scores.clone(), B, first)
    assert got.dtype == dtype and not got[~sees.expand_as(got)].any()
    if dtype == torch.bfloat16:  # exp one fp32 bit apart, rarely a bf16 step
        assert (got != want).float().mean() < 1e-2
        torch.testing.assert_close(got, want, atol=1e-30, rtol=2 ** -7)
    else:
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="not whole blocks"):
        causal_softmax_(scores[..., :-1], B, first)


@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_fp32", "grouped", "paged"])
def test_every_forced_kernel_gives_sdpa_outputs_in_every_case(kernel):
    set_attention_kernel(kernel)
    torch.manual_seed(0)
    D, dtype = 16, torch.bfloat16
    q = torch.randn(5, 9, 1, D, dtype=dtype)  # a decode step: 5 sequences padded to 40 keys
    k, v = cache_layout(5, 40, 3, D, dtype), cache_layout(5, 40, 3, D, dtype)
    mask = (torch.arange(40)[None, :] < torch.tensor([40, 3, 17, 1, 33])[:, None])[:, None]
    torch.testing.assert_close(attend(q, k, v, mask).double(), reference(q, k, v, mask, False), atol=3e-2, rtol=3e-2)
    q = torch.randn(1, 9, 6, D, dtype=dtype)  # a chunk of 6 queries at positions 10..15 after cached context
    k, v = cache_layout(1, 16, 3, D, dtype), cache_layout(1, 16, 3, D, dtype)
    torch.testing.assert_close(attend(q, k, v, causal=True).double(), reference(q, k, v, None, True),
                               atol=3e-2, rtol=3e-2)
    mask = (torch.arange(16)[None, :] <= torch.tensor([3, 9, 10, 12, 14, 15])[:, None])[None]  # 6 of its rows
    torch.testing.assert_close(attend(q, k, v, mask).double(), reference(q, k, v, mask, False), atol=3e-2, rtol=3e-2)
    q = torch.randn(3, 9, 1, D, dtype=dtype)  # one token from position 0 (no mask)
    k, v = cache_layout(3, 1, 3, D, dtype), cache_layout(3, 1, 3, D, dtype)
    torch.testing.assert_close(attend(q, k, v).double(), reference(q, k, v, None, False), atol=3e-2, rtol=3e-2)
    q = torch.randn(1, 9, 200, D, dtype=dtype)  # a whole prompt
    k, v = cache_layout(1, 200, 3, D, dtype), cache_layout(1, 200, 3, D, dtype)
    torch.testing.assert_close(attend(q, k, v, causal=True).double(), reference(q, k, v, None, True),
                               atol=3e-2, rtol=3e-2)


@needs_flash
@pytest.mark.parametrize("R, H, Hkv, M, L, D", [
    (1, 9, 3, 300, 300, 64),  # a prompt: past whole chunks of keys and whole tiles of queries
    (3, 4, 2, 17, 17, 32),  # several prompts, head dim 32
    (1, 9, 3, 64, 512, 64),  # a chunk after 448 cached positions
    (2, 4, 4, 5, 133, 64),  # a short chunk after context, no grouping
    (1, 9, 3, 1, 1, 64),  # one token from position 0
])
def test_flash_matches_sdpa_on_causal_prompts_and_chunks(R, H, Hkv, M, L, D):
    torch.manual_seed(M + L)
    q = torch.randn(R, H, M, D, dtype=torch.bfloat16) * 2
    k, v = cache_layout(R, L, Hkv, D, torch.bfloat16) * 2, cache_layout(R, L, Hkv, D, torch.bfloat16)
    got = flash_attention(q, k, v)
    assert got.shape == (R, H, M, D) and got.transpose(1, 2).is_contiguous()  # rows laid out (R, M, H, D)
    torch.testing.assert_close(got.double(), reference(q, k, v, None, True), atol=2e-2, rtol=2e-2)
    set_attention_kernel("flash")  # forced, through attend
    torch.testing.assert_close(attend(q, k, v, causal=True), got, atol=0, rtol=0)


@needs_flash
def test_flash_over_the_paged_cache_in_place_matches_sdpa_for_sequences_of_a_step():
    """Three sequences of one step over scattered blocks: a 70-token prompt, a chunk of 20 after 45
    cached positions, a 3-token prompt; each writes its own rows of the output."""
    torch.manual_seed(1)
    bs, H, Hkv, D = 16, 9, 3, 64
    k_cache, v_cache = (torch.randn(40 * bs, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.tensor([[7, 3, 30, 12, 5], [21, 2, 9, 0, 0], [38, 0, 0, 0, 0]])
    rows, ctx = [70, 20, 3], [70, 65, 3]
    starts = [0, 70, 90]
    q = torch.randn(93, H, D, dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    flash_paged_attention(q, k_cache, v_cache, tables, starts, rows, ctx, bs, out)
    for s in range(3):
        keys = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in tables[s].tolist()])[: ctx[s]]
        k, v = (c[keys].transpose(0, 1)[None] for c in (k_cache, v_cache))  # (1, Hkv, L, D)
        want = reference(q[starts[s] : starts[s] + rows[s]].transpose(0, 1)[None], k, v, None, True)
        got = out[starts[s] : starts[s] + rows[s]].transpose(0, 1)[None]
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="outside tables"):  # a context past its table
        flash_paged_attention(q, k_cache, v_cache, tables, starts, rows, [70, 65, 81], bs, out)
    with pytest.raises(ValueError, match="do not fit"):  # rows past q
        flash_paged_attention(q, k_cache, v_cache, tables, starts, [70, 20, 4], ctx, bs, out)


@needs_flash
def test_flash_refuses_what_it_cannot_run():
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)  # head dim 16
    with pytest.raises(RuntimeError, match="head dim 16"):
        flash_attention(q, cache_layout(1, 8, 2, 16, torch.bfloat16), cache_layout(1, 8, 2, 16, torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        flash_attention(q.float(), cache_layout(1, 8, 2, 16, torch.float32), cache_layout(1, 8, 2, 16, torch.float32))
    set_attention_kernel("flash")
    with pytest.raises(RuntimeError, match="flash attention kernel does not run here"):
        attend(q.float(), cache_layout(1, 8, 2, 16, torch.float32), cache_layout(1, 8, 2, 16, torch.float32), causal=True)


def test_the_flash_unit_is_what_this_cpu_has():
    """AMX tiles where the CPU has AMX-BF16, else AVX-512 BF16 vectors, else none (the kernel is no candidate)."""
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    unit = flash_unit()
    if not native.available(torch.bfloat16, torch.device("cpu")):
        assert unit is None
    elif {"amx_bf16", "amx_tile"} <= flags:
        assert unit in ("amx", None)  # None: Linux refused the tile state
    elif "avx512_bf16" in flags:
        assert unit == "avx512_bf16"
    else:
        assert unit is None and not flash_available(torch.bfloat16, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_measures_each_case_once_and_keeps_a_kernel_only_if_it_beats_sdpa(dtype):
    set_attention_kernel("auto")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, dtype=dtype), cache_layout(2, 24, 2, 8, dtype), cache_layout(2, 24, 2, 8, dtype)
    mask = torch.ones(2, 1, 24, dtype=torch.bool)
    with torch.inference_mode():
        out = attend(q, k, v, mask)
        attend(q, k, v, mask)
        prompt = torch.randn(1, 4, 30, 8, dtype=dtype)
        attend(prompt, cache_layout(1, 30, 2, 8, dtype), cache_layout(1, 30, 2, 8, dtype), causal=True)
    choices = attention_kernel_choices()
    assert [c["case"] for c in choices] == ["decode", "prompt"]  # measured once each, on first use
    for choice in choices:
        timed = {key[:-3]: t for key, t in choice.items() if key.endswith("_us")}
        assert all(len(t) == 2 for t in timed.values()) and len(choice["kernels"]) == 2
        for i, kernel in enumerate(choice["kernels"]):  # short, then long context
            assert kernel in timed
            if kernel != "sdpa":  # a winner beat SDPA by 5% at that context, and every other candidate
                assert timed[kernel][i] < 0.95 * timed["sdpa"][i]
                assert timed[kernel][i] == min(t[i] for t in timed.values())
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, False), atol=3e-2, rtol=3e-2)


def test_warm_up_makes_every_cases_choice_before_traffic():
    """Decode, prompt and chunk-after-context choices at start-up: none is measured under load."""
    set_attention_kernel("auto")  # forgets earlier choices
    warm_up_attention(4, 2, 8, torch.float32, max_seqs=2, max_len=64, max_prompt=64)
    assert sorted(c["case"] for c in attention_kernel_choices()) == ["chunk", "decode", "masked", "prompt"]


def test_a_mask_and_causal_together_are_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="a mask or causal, not both"):
        attend(q, q, q, torch.ones(1, 3, 3, dtype=torch.bool), causal=True)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="must be one of auto, sdpa, sdpa_fp32, grouped, paged, flash"):
        set_attention_kernel("amx")  # the flash kernel's name before it also ran in AVX-512 BF16 vectors


def test_an_unknown_kernel_in_the_environment_fails_at_start_up_with_the_names():
    env = {**os.environ, "PONDER_CPU_ATTENTION": "amx"}
    run = subprocess.run([sys.executable, "-c", "import runtime.attention"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "PONDER_CPU_ATTENTION: attention kernel 'amx' must be one of auto, sdpa, sdpa_fp32, grouped, paged, flash" in run.stderr


def test_grouped_gemms_run_few_shapes_whatever_the_batch():
    """oneDNN keeps a kernel per GEMM shape, so the buckets bound how many a server builds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GemmShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
                self.seen.add((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    with GemmShapes() as decode:  # (sequences, keys) -> (1, 2, 4 or 8 sequences) x (256 or 512 keys)
        for R, L in [(3, 40), (4, 200), (5, 300), (8, 500), (2, 256), (1, 512), (7, 33)]:
            q = torch.randn(R, 9, 1, 8)
            grouped_decode(q, cache_layout(R, L, 3, 8, torch.float32), cache_layout(R, L, 3, 8, torch.float32), None)
    assert len(decode.seen) == 2 * 5  # QK and PV for (4, 256), (8, 512), (2, 256), (1, 512), (8, 256)
    with GemmShapes() as prompt:  # any prompt or chunk up to 256 positions: blocks ending at 128 or 256 keys
        for start, T in [(0, 5), (0, 100), (0, 130), (0, 250), (0, 256), (90, 10), (100, 60), (129, 127)]:
            q = torch.randn(1, 9, T, 8)
            k, v = (cache_layout(1, start + T, 3, 8, torch.float32) for _ in range(2))
            grouped_attention(q, k, v)
    assert len(prompt.seen) == 2 * 2
