"""The CPU attention kernels: grouped GEMMs give SDPA's outputs for every case the engine runs (a
padded decode step, a causal prompt over several blocks, a chunk after cached context), and the
auto mode measures and records its choice."""

import pytest
import torch
import torch.nn.functional as F

from runtime import attention
from runtime.attention import CAUSAL_BLOCK, attend, attention_kernel_choices, grouped_attention, set_attention_kernel


@pytest.fixture(autouse=True)
def restore_mode():
    mode = attention._mode
    yield
    set_attention_kernel(mode)


def cache_layout(R, L, Hkv, D, dtype):
    """k or v as the paged cache gathers it: (R, Hkv, L, D), a transposed view of (R, L, Hkv, D)."""
    return torch.randn(R, L, Hkv, D, dtype=dtype).transpose(1, 2)


def reference(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                          attn_mask=None if mask is None else mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("H, Hkv", [(9, 3), (4, 4)])
def test_grouped_gemms_match_sdpa_in_every_case(dtype, tol, H, Hkv):
    torch.manual_seed(0)
    D = 16
    # a decode step: 5 sequences of different lengths, padded to 40 keys
    q = torch.randn(5, H, 1, D, dtype=dtype)
    k, v = cache_layout(5, 40, Hkv, D, dtype), cache_layout(5, 40, Hkv, D, dtype)
    mask = (torch.arange(40)[None, :] < torch.tensor([40, 3, 17, 1, 33])[:, None])[:, None]
    torch.testing.assert_close(grouped_attention(q, k, v, mask).double(), reference(q, k, v, mask, False), atol=tol, rtol=tol)
    # a whole prompt, causal over more than two query blocks
    T = 2 * CAUSAL_BLOCK + 37
    q = torch.randn(1, H, T, D, dtype=dtype)
    k, v = cache_layout(1, T, Hkv, D, dtype), cache_layout(1, T, Hkv, D, dtype)
    torch.testing.assert_close(grouped_attention(q, k, v, causal=True).double(), reference(q, k, v, None, True),
                               atol=tol, rtol=tol)
    # a chunk of 6 queries at positions 10..15 after cached context
    q = torch.randn(1, H, 6, D, dtype=dtype)
    k, v = cache_layout(1, 16, Hkv, D, dtype), cache_layout(1, 16, Hkv, D, dtype)
    mask = (torch.arange(16)[None, :] <= torch.arange(10, 16)[:, None])[None]
    torch.testing.assert_close(grouped_attention(q, k, v, mask).double(), reference(q, k, v, mask, False), atol=tol, rtol=tol)


def test_auto_measures_each_case_once_and_attend_follows_the_choice():
    set_attention_kernel("auto")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), cache_layout(2, 24, 2, 8, torch.float32), cache_layout(2, 24, 2, 8, torch.float32)
    mask = torch.ones(2, 1, 24, dtype=torch.bool)
    with torch.inference_mode():
        out = attend(q, k, v, mask)
        attend(q, k, v, mask)
    choices = attention_kernel_choices()
    assert [c["case"] for c in choices] == ["decode"]  # measured once, on the first call
    (choice,) = choices
    assert choice["kernel"] in ("sdpa", "grouped") and len(choice["sdpa_us"]) == len(choice["grouped_us"]) == 2
    faster = all(g < 0.95 * s for s, g in zip(choice["sdpa_us"], choice["grouped_us"]))
    assert choice["kernel"] == ("grouped" if faster else "sdpa")
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, False))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="must be one of auto, sdpa, grouped"):
        set_attention_kernel("flash")
