"""Masked pooling: padding never counts, NaN at pads cannot leak, empty rows are errors."""
from __future__ import annotations

import pytest
import torch

from harness.extractors.engine.pooling import EmptyMaskError, last_token, masked_mean, pool, token_mask


def test_mean_uses_only_masked_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_left_and_right_padding_give_the_same_mean():
    tokens = torch.randn(1, 3, 5)
    pad = torch.full((1, 2, 5), 7.0)
    right = masked_mean(torch.cat([tokens, pad], 1), torch.tensor([[1, 1, 1, 0, 0]]))
    left = masked_mean(torch.cat([pad, tokens], 1), torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(right, tokens.mean(1))
    torch.testing.assert_close(left, tokens.mean(1))


def test_nan_and_inf_at_pad_positions_do_not_leak():
    hidden = torch.tensor([[[1.0], [float("nan")], [float("inf")], [3.0]]])
    mask = torch.tensor([[True, False, False, True]])
    assert torch.equal(masked_mean(hidden, mask), torch.tensor([[2.0]]))
    assert torch.equal(last_token(hidden, mask), torch.tensor([[3.0]]))


def test_accumulates_in_float32_for_bf16_input():
    # 256 copies of 1 + 2^-7 sum to a value bf16 cannot hold exactly; float32 can.
    hidden = torch.full((1, 256, 1), 1.0 + 2 ** -7, dtype=torch.bfloat16)
    out = masked_mean(hidden, torch.ones(1, 256, dtype=torch.bool))
    assert out.dtype == torch.float32
    assert out.item() == 1.0 + 2 ** -7


def _float64_mean(hidden, mask):
    """Independent reference: the masked mean in float64, by a plain loop over rows."""
    rows = [hidden[b, mask[b]].double().mean(dim=0) for b in range(hidden.shape[0])]
    return torch.stack(rows)


def test_bf16_hidden_states_of_realistic_shape_match_a_float64_reference():
    """Random bf16 hidden states of the real shape (8 x 300 x 2304, SpatialVLA's width),
    ragged masks: summing and dividing in float32 stays within 1e-5 of float64; doing it
    in bf16 moves features by ~1e-3 and must fail this test (checked below)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 300, 2304, generator=gen).mul(3).to(torch.bfloat16)
    lengths = torch.tensor([300, 299, 257, 200, 151, 100, 37, 1])
    mask = torch.arange(300)[None, :] < lengths[:, None]
    ref = _float64_mean(hidden, mask)
    out = masked_mean(hidden, mask)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-5
    # The same tolerance rejects the defect the issue describes (bf16 sum and divide):
    m = mask.unsqueeze(-1)
    in_bf16 = torch.where(m, hidden, hidden.new_zeros(())).sum(1) / mask.sum(1, keepdim=True).to(torch.bfloat16)
    assert (in_bf16.double() - ref).abs().max().item() > 1e-4


def test_empty_mask_names_the_row():
    hidden = torch.randn(3, 4, 2)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(EmptyMaskError, match=r"row\(s\) \[1\]") as err:
        masked_mean(hidden, mask)
    assert err.value.rows == [1]
    with pytest.raises(EmptyMaskError):
        last_token(hidden, mask)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected hidden"):
        masked_mean(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


def test_last_token_for_both_padding_sides():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert last_token(hidden, mask).flatten().tolist() == [1.0, 7.0]


def test_pool_dispatch_and_unknown_mode():
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(pool(hidden, mask, "last"), hidden[:, -1])
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(hidden, mask, "max")


def test_token_masks_split_image_and_text():
    ids = torch.tensor([[0, 9, 9, 5, 6], [9, 9, 5, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    image = token_mask(attn, ids, image_token_id=9, tokens="image")
    text = token_mask(attn, ids, image_token_id=9, tokens="text")
    assert image.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert text.tolist() == [[False, False, False, True, True], [False, False, True, False, False]]
    assert torch.equal(token_mask(attn), attn.bool())
    with pytest.raises(ValueError, match="needs input_ids"):
        token_mask(attn, tokens="image")
