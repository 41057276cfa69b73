"""The reference itself: it must agree with PyTorch's own attention where both are defined."""
import pytest
import torch
import torch.nn.functional as F

import headsparse as hs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_reference_matches_sdpa(causal, hq, hkv):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, hq, 19, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, 19, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, 19, 32, generator=g, dtype=torch.float64)
    ref = hs.attention_reference(q, k, v, causal=causal)
    rep = hq // hkv
    expect = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                            is_causal=causal)
    torch.testing.assert_close(ref, expect, atol=1e-12, rtol=0)


def test_reference_bool_mask_matches_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 11, 11, generator=g) > 0.3
    mask[..., 0] = True  # sdpa gives NaN for empty rows; keep every row non-empty here
    ref = hs.attention_reference(q, k, v, attention_mask=mask)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ref, expect, atol=1e-12, rtol=0)


def test_reference_empty_rows_are_zero_with_finite_grads():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out = hs.attention_reference(q, k, v, attention_mask=mask)
    assert (out[:, :, 2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
