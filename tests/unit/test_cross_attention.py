"""Cross-attention through a block's own timm Attention, and the weight-sharing three branches."""

from __future__ import annotations

import pytest
import torch

from udaflow import methods
from udaflow.models import build_classifier, create_backbone
from udaflow.models.cross_attention import check_vit, cross_attend, three_branch_features


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone("udaflow_vit_micro").eval()


def test_cross_attend_with_itself_is_the_block_attention(backbone):
    g = torch.Generator().manual_seed(1)
    for blk in backbone.blocks:
        n = backbone.patch_embed.num_patches
        x = blk.norm1(torch.randn(2, n, backbone.embed_dim, generator=g))
        with torch.no_grad():
            got = cross_attend(blk.attn, x, x)
            expected = blk.attn(x)
        assert got.shape == expected.shape == (2, n, backbone.embed_dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cross_attend_queries_and_context_of_different_lengths(backbone):
    attn = backbone.blocks[0].attn
    d = backbone.embed_dim
    g = torch.Generator().manual_seed(2)
    q, ctx = torch.randn(3, 5, d, generator=g), torch.randn(3, 11, d, generator=g)
    out = cross_attend(attn, q, ctx)
    assert out.shape == (3, 5, d)
    # keys/values really come from the context: permuting the context tokens changes nothing
    # (attention is permutation invariant over keys), replacing them changes the output
    perm = torch.randperm(11, generator=g)
    torch.testing.assert_close(cross_attend(attn, q, ctx[:, perm]), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cross_attend(attn, q, torch.randn(3, 11, d, generator=g)), out, atol=1e-3)
    # each query is answered independently: the first query's answer ignores the others
    torch.testing.assert_close(cross_attend(attn, q[:, :1], ctx), out[:, :1], atol=1e-5, rtol=1e-5)


def test_check_vit_rejects_a_non_vit():
    with pytest.raises(ValueError, match="VisionTransformer"):
        check_vit(torch.nn.Linear(2, 2))


def test_three_branch_shapes_and_self_branches_equal_plain_forward(backbone):
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        f_s, f_t, f_st = three_branch_features(backbone, src, tgt)
        plain_s, plain_t = backbone(src), backbone(tgt)
    d = backbone.num_features
    assert f_s.shape == f_t.shape == f_st.shape == (4, d)
    torch.testing.assert_close(f_s, plain_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_t, plain_t, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f_st, f_s, atol=1e-4)  # the cross branch sees the target


def test_cdtrans_adds_no_attention_parameters():
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    n_clf = sum(p.numel() for p in clf.parameters())
    method = methods.create_method("cdtrans", clf)
    assert sum(p.numel() for p in method.parameters()) == 0
    assert sum(p.numel() for p in clf.parameters()) == n_clf  # creating the method added nothing
    qkv = [n for n, _ in clf.named_parameters() if n.endswith("attn.qkv.weight")]
    assert len(qkv) == len(clf.backbone.blocks) == 2  # one attention set per block, shared by all branches


@pytest.mark.parametrize("branch", [0, 1, 2], ids=["source", "target", "cross"])
def test_each_branch_backpropagates_into_shared_qkv(branch):
    torch.manual_seed(0)
    backbone = create_backbone("udaflow_vit_micro").train()
    g = torch.Generator().manual_seed(4)
    src, tgt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    feats = three_branch_features(backbone, src, tgt)
    # pooled features end in a LayerNorm with unit gain and zero bias, whose plain .sum() is
    # constant (zero gradient); a fixed random projection of the pooled output is used instead
    proj = torch.randn(backbone.num_features, generator=g)
    (feats[branch] @ proj).sum().backward()
    grad = backbone.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    d = backbone.embed_dim
    q_grad, k_grad, v_grad = grad[:d], grad[d : 2 * d], grad[2 * d :]
    for part in (q_grad, k_grad, v_grad):
        assert part.abs().sum() > 0


def test_cross_branch_gradient_reaches_target_input():
    """The cross branch's keys/values are the target tokens: its output depends on the target image."""
    torch.manual_seed(0)
    # eval mode: the stem's BatchNorm uses running statistics, so the target can only reach the
    # cross branch through the attention keys/values
    backbone = create_backbone("udaflow_vit_micro").eval()
    g = torch.Generator().manual_seed(5)
    src = torch.randn(2, 3, 32, 32, generator=g)
    tgt = torch.randn(2, 3, 32, 32, generator=g, requires_grad=True)
    _, _, f_st = three_branch_features(backbone, src, tgt)
    (f_st @ torch.randn(backbone.num_features, generator=g)).sum().backward()
    assert tgt.grad is not None and tgt.grad.abs().sum() > 0
