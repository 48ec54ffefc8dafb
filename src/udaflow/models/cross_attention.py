"""Weight-sharing source / target / cross-attention branches over one ViT (CDTrans, Xu et al. 2022).

The three branches run through the SAME blocks. In the cross branch, each block's attention takes
queries from the source tokens and keys/values from the paired target tokens, projected by the
block's own `qkv` weights, so there is one set of attention parameters and the cross branch's
gradients reach it together with the two self-attention branches'.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_vit(backbone: nn.Module) -> None:
    needed = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head")
    missing = [a for a in needed if not hasattr(backbone, a)]
    if missing:
        raise ValueError(
            f"cross-attention needs a timm VisionTransformer-style backbone; "
            f"{type(backbone).__name__} lacks {missing}"
        )


def cross_attend(attn: nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """timm Attention with queries from `queries` (B, N, C) and keys/values from `context` (B, M, C)."""
    b, n, c = queries.shape
    m = context.shape[1]
    h, hd = attn.num_heads, attn.head_dim
    w_q, w_k, w_v = attn.qkv.weight.chunk(3, dim=0)  # each (C_attn, C): the block's own projections
    b_q = b_k = b_v = None
    if attn.qkv.bias is not None:
        b_q, b_k, b_v = attn.qkv.bias.chunk(3, dim=0)
    q = F.linear(queries, w_q, b_q).reshape(b, n, h, hd).transpose(1, 2)  # (B, heads, N, hd)
    k = F.linear(context, w_k, b_k).reshape(b, m, h, hd).transpose(1, 2)  # (B, heads, M, hd)
    v = F.linear(context, w_v, b_v).reshape(b, m, h, hd).transpose(1, 2)  # (B, heads, M, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(1, 2).reshape(b, n, h * hd)  # (B, N, C_attn)
    x = attn.norm(x)
    return attn.proj_drop(attn.proj(x))


def three_branch_features(
    backbone: nn.Module, source: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features (B, D) of the source, target and cross (source-query x target-key/value) branches.

    source and target are paired images (B, 3, H, W). At every block the cross branch adds the
    attention of the source branch's queries over the target branch's keys/values (both taken at
    that depth) to its own residual stream, which starts from the source tokens.
    """
    check_vit(backbone)

    # one embedding pass over both domains: a stem with BatchNorm then normalises with mixed-domain
    # batch statistics, the same statistics its running averages hold at inference
    tokens = backbone.patch_embed(torch.cat([source, target]))  # (2B, N, D)
    tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(tokens)))
    s, t = tokens.chunk(2)  # (B, N', D) each
    c = s
    for blk in backbone.blocks:
        s_in, t_in = s, t
        s = blk(s_in)
        t = blk(t_in)
        c = c + blk.drop_path1(blk.ls1(cross_attend(blk.attn, blk.norm1(s_in), blk.norm1(t_in))))
        c = c + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(c))))
    pool = lambda x: backbone.forward_head(backbone.norm(x), pre_logits=True)  # noqa: E731
    return pool(s), pool(t), pool(c)
