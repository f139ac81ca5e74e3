import pytest
import torch
import torch.nn.functional as F

from megadigpt.model.masks import SegmentLayout, segment_causal_mask, segment_patch_index


def spec_table(num_visible: int, T: int) -> torch.Tensor:
    """The visibility table of spec §2, written out rule by rule."""
    L = num_visible * T + 1
    cls = L - 1
    seg = lambda i: i // T  # noqa: E731
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if q == cls:
                m[q, k] = True  # CLS sees everything
            elif k == cls:
                m[q, k] = seg(q) == num_visible - 1  # only the last visible segment sees CLS
            else:
                m[q, k] = seg(k) <= seg(q)  # block-causal, bidirectional inside a segment
    return m


def reference_mask(num_visible: int, T: int) -> torch.Tensor:
    """The reference implementation's construction (tril, repeat, reflect pad), as a boolean table."""
    mask = torch.tril(torch.ones(num_visible, num_visible))
    mask = mask.masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0)
    mask = torch.repeat_interleave(torch.repeat_interleave(mask, T, dim=0), T, dim=1)
    mask = F.pad(mask[None, None], (0, 1, 0, 1), mode="reflect")[0, 0]
    return mask == 0


@pytest.mark.parametrize("segment_grid,grid", [(2, 14), (2, 16), (3, 9), (4, 16), (2, 4)])
def test_mask_equals_spec_table_and_reference(segment_grid, grid):
    lay = SegmentLayout(grid, segment_grid)
    m = lay.mask()
    assert m.shape == (lay.seq_len, lay.seq_len)
    assert torch.equal(m, spec_table(lay.num_visible, lay.tokens_per_segment))
    assert torch.equal(m, reference_mask(lay.num_visible, lay.tokens_per_segment))


def test_vit_b16_sequence():
    lay = SegmentLayout(14, 2)
    assert (lay.num_segments, lay.tokens_per_segment, lay.seq_len) == (4, 49, 148)
    lay = SegmentLayout(16, 2)  # ViT-L/14, ViT-H/14 at 224
    assert lay.seq_len == 193


def test_segments_are_quadrants_row_major():
    idx = segment_patch_index(14, 2)
    grid = torch.arange(196).reshape(14, 14)
    quads = [grid[:7, :7], grid[:7, 7:], grid[7:, :7], grid[7:, 7:]]
    for s, q in enumerate(quads):
        assert torch.equal(idx[s], q.reshape(-1))


def test_bad_layouts():
    with pytest.raises(ValueError):
        SegmentLayout(14, 3)
    with pytest.raises(ValueError):
        SegmentLayout(14, 1)


@pytest.mark.parametrize("grid,segment_grid", [(14, 2), (16, 2), (16, 4), (8, 4)])  # patch 16 and 14 at 224 px
def test_prefix_backend_equals_eager_forward_and_backward(grid, segment_grid):
    """The mask-free backend computes the segment mask exactly: runs read off the mask, every run a prefix."""
    from megadigpt.model.attention import AttentionMask, masked_attention

    lay = SegmentLayout(grid, segment_grid)
    mask = AttentionMask(lay.mask())
    T, V = lay.tokens_per_segment, lay.num_visible
    assert mask.prefix_runs == tuple((k * T, (k + 1) * T, (k + 1) * T) for k in range(V - 1)) + (
        ((V - 1) * T, lay.seq_len, lay.seq_len),)
    g = torch.Generator().manual_seed(grid * 10 + segment_grid)
    q, k, v = (torch.randn(2, 3, lay.seq_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    weight = torch.randn(2, 3, lay.seq_len, 8, generator=g, dtype=torch.float64)
    res = {}
    for b in ("eager", "prefix"):
        out = masked_attention(q, k, v, mask, b)
        res[b] = (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))
    for got, want in zip(res["prefix"], res["eager"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_prefix_backend_refuses_a_mask_that_is_not_prefixes():
    from megadigpt.model.attention import AttentionMask, masked_attention

    dense = torch.ones(4, 4, dtype=torch.bool)
    dense[1, 0] = False  # row 1 sees key 1 but not key 0
    mask = AttentionMask(dense)
    assert mask.prefix_runs is None
    with pytest.raises(ValueError, match="prefix"):
        masked_attention(*(torch.randn(1, 1, 4, 2) for _ in range(3)), mask, "prefix")
