"""Backbones: udaflow's ViTs are real timm models; names and weight files fail clearly."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from udaflow.models import BackboneError, build_classifier, create_backbone
from udaflow.costs import training_gflop_per_image
from udaflow.models.backbone import STEM_ACTS, ConvStem, SeqPool


@pytest.mark.parametrize("name", ["udaflow_vit_tiny3", "udaflow_vit_tiny2", "udaflow_vit_tiny"])
def test_udaflow_vit_tiny_is_a_timm_vision_transformer(name):
    model = timm.create_model(name, num_classes=10)
    assert isinstance(model, VisionTransformer)
    assert isinstance(model.patch_embed, ConvStem)
    assert model.num_classes == 10 and model.head.out_features == 10
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # the stem's tokens cover the 32x32 image exactly
    grid = model.patch_embed.grid_size
    assert grid[0] * model.patch_embed.patch_size[0] == 32 and model.patch_embed.num_patches == grid[0] * grid[1]
    assert model.patch_embed(torch.zeros(1, 3, 32, 32)).shape == (1, model.patch_embed.num_patches, model.embed_dim)


def test_tiny2_is_tiny_with_a_wider_stem_and_one_block_fewer():
    """A registered name stands for one architecture: udaflow_vit_tiny with stem_width 16 and depth 3,
    the same parameters drawn from the same seed; udaflow_vit_tiny itself keeps its 4 blocks and
    12-24-48-96 stem, so models packaged under that name still load."""
    torch.manual_seed(0)
    new = timm.create_model("udaflow_vit_tiny2", num_classes=10)
    torch.manual_seed(0)
    spelled_out = timm.create_model("udaflow_vit_tiny", num_classes=10, stem_width=16, depth=3)
    assert new.state_dict().keys() == spelled_out.state_dict().keys()
    assert all(torch.equal(v, spelled_out.state_dict()[k]) for k, v in new.state_dict().items())
    widths = lambda m: [c.out_channels for c in m.patch_embed.stem if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    old = timm.create_model("udaflow_vit_tiny", num_classes=10)
    assert (widths(new), len(new.blocks)) == ([16, 32, 64, 96], 3)
    assert (widths(old), len(old.blocks)) == ([12, 24, 48, 96], 4)
    # and the old default is the new name at stem_width 12, depth 4
    back = timm.create_model("udaflow_vit_tiny2", num_classes=10, stem_width=12, depth=4)
    assert (widths(back), len(back.blocks)) == ([12, 24, 48, 96], 4)


def test_seq_pool_weights_the_tokens_by_a_learned_softmax_and_uniform_weights_are_the_mean():
    torch.manual_seed(0)
    pool = SeqPool(8)
    x = torch.randn(2, 5, 8)  # (B, N, D)
    with torch.no_grad():
        w = torch.softmax(torch.nn.functional.layer_norm(x, (8,), pool.norm.weight, pool.norm.bias) @ pool.score.weight.T + pool.score.bias, dim=1)
        assert torch.allclose(pool(x), (w * x).sum(1), atol=1e-6)
        assert not torch.allclose(pool(x), x.mean(1), atol=1e-3)
        pool.score.weight.zero_()  # every token scored alike: the token mean, timm's global_pool "avg"
        assert torch.allclose(pool(x), x.mean(1), atol=1e-6)


def test_tiny3_is_tiny2_pooled_by_seq_pool_at_the_same_cost():
    """The default's name stands for udaflow_vit_tiny2's backbone, the same weights from the same seed,
    plus SeqPool (3 x 96 + 1 parameters) in place of the token mean; the same training FLOPs to 0.1%."""
    torch.manual_seed(0)
    new = timm.create_model("udaflow_vit_tiny3", num_classes=0)
    torch.manual_seed(0)
    old = timm.create_model("udaflow_vit_tiny2", num_classes=0)
    extra = {k: v for k, v in new.state_dict().items() if k not in old.state_dict()}
    assert sorted(extra) == ["attn_pool.norm.bias", "attn_pool.norm.weight", "attn_pool.score.bias", "attn_pool.score.weight"]
    assert sum(v.numel() for v in extra.values()) == 3 * 96 + 1
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    assert isinstance(new.attn_pool, SeqPool) and old.attn_pool is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = new.eval().forward_features(x)  # (4, 16, 96)
        assert torch.allclose(new(x), new.fc_norm(new.attn_pool(tokens)), atol=1e-6)
        assert not torch.allclose(new(x), new.fc_norm(tokens.mean(1)), atol=1e-3)
    cost = lambda name: training_gflop_per_image(build_classifier(name, 10), 32)  # noqa: E731
    assert cost("udaflow_vit_tiny3") == pytest.approx(cost("udaflow_vit_tiny2"), rel=1e-3)
    with pytest.raises(BackboneError, match="seq_pool pools the tokens itself: global_pool must stay 'avg', not 'max'"):
        timm.create_model("udaflow_vit_tiny3", global_pool="max")  # never a silently ignored pooling


def test_micro_backbone_returns_pooled_features():
    bb = create_backbone("udaflow_vit_micro")
    assert isinstance(bb, VisionTransformer)
    assert bb.num_classes == 0  # no classifier: forward returns pooled features
    with torch.no_grad():
        assert bb.eval()(torch.zeros(3, 3, 32, 32)).shape == (3, bb.num_features)
    clf = build_classifier("udaflow_vit_micro", 5)
    with torch.no_grad():
        assert clf.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_backbone_raises():
    with pytest.raises(BackboneError, match="unknown backbone 'not_a_model'"):
        create_backbone("not_a_model")


@pytest.mark.parametrize("name", ["udaflow_vit_tiny3", "udaflow_vit_tiny2", "udaflow_vit_tiny", "udaflow_vit_micro"])
def test_udaflow_backbones_have_no_published_weights(name):
    with pytest.raises(BackboneError, match=f"^{name} has no published weights"):
        timm.create_model(name, pretrained=True)


def test_missing_weights_file_raises():
    with pytest.raises(BackboneError, match="/nonexistent.pt"):
        create_backbone("udaflow_vit_micro", pretrained="/nonexistent.pt")


@pytest.mark.parametrize("form", ["state_dict", "wrapped", "safetensors", "safetensors_other_suffix"])
def test_weights_file_round_trip(tmp_path, form):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    original = create_backbone("udaflow_vit_micro")
    state = original.state_dict()
    path = tmp_path / ("weights.safetensors" if form == "safetensors" else "weights.bin")
    if form.startswith("safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if form == "wrapped" else state, path)
    torch.manual_seed(2)
    loaded = create_backbone("udaflow_vit_micro", pretrained=str(path))
    assert loaded.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fresh = create_backbone("udaflow_vit_micro")
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_weights_file_without_matching_tensors_raises(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(BackboneError, match="no tensor in this file matches"):
        create_backbone("udaflow_vit_micro", pretrained=str(path))


def test_weights_of_another_architecture_raise_backbone_error(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(create_backbone("udaflow_vit_tiny").state_dict(), path)
    with pytest.raises(BackboneError):
        create_backbone("udaflow_vit_micro", pretrained=str(path))


def test_conv_stem_rejects_other_patch_sizes():
    with pytest.raises(BackboneError, match="patch_size"):
        ConvStem(patch_size=16)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_strided_stem_drops_the_full_resolution_conv(patch_size):
    full = ConvStem(img_size=32, patch_size=patch_size, embed_dim=96, stem_width=32)
    strided = ConvStem(img_size=32, patch_size=patch_size, embed_dim=96, stem_width=32, stem_first_stride=2)
    convs = [m for m in strided.stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len([m for m in full.stem if isinstance(m, torch.nn.Conv2d)]) - 1
    assert all(c.stride == (2, 2) for c in convs)
    assert [c.out_channels for c in convs] == [min(96, 32 << i) for i in range(len(convs) - 1)] + [96]
    x = torch.randn(2, 3, 32, 32)
    assert strided(x).shape == full(x).shape == (2, (32 // patch_size) ** 2, 96)  # the same tokens


def test_conv_stem_runs_channels_last_and_computes_the_nchw_function():
    """The stem runs its convolutions channels-last (a speed choice): the tokens are the plain NCHW stem's
    up to summation order, come out contiguous, and the weights stay ordinary contiguous tensors
    (safetensors refuses strided ones)."""
    torch.manual_seed(0)
    stem = ConvStem(img_size=32, patch_size=8, embed_dim=96).eval()
    x = torch.randn(4, 3, 32, 32)
    tokens = stem(x)
    reference = stem.stem(x.contiguous()).flatten(2).transpose(1, 2)  # NCHW all the way
    torch.testing.assert_close(tokens, reference, rtol=1e-4, atol=1e-5)
    assert tokens.shape == (4, 16, 96) and tokens.is_contiguous()
    assert all(p.is_contiguous() for p in stem.parameters())
    tokens.sum().backward()  # gradients reach every weight in the usual layout
    assert all(p.grad is not None and p.grad.shape == p.shape for p in stem.parameters())


def test_strided_stem_rejects_other_strides():
    with pytest.raises(BackboneError, match="stem_first_stride"):
        ConvStem(patch_size=8, stem_first_stride=4)


def test_stem_activation_is_an_option_with_the_same_weights():
    """`stem_act` swaps the stem's activation (no weights either way): the state dict keeps its keys and
    shapes, so a ReLU stem loads a GELU stem's weights; the default stays GELU, the registered models unchanged."""
    gelu = create_backbone("udaflow_vit_tiny3")
    relu = create_backbone("udaflow_vit_tiny3", stem_act="relu")
    acts = lambda m: [type(a) for a in m.patch_embed.stem if isinstance(a, (torch.nn.GELU, torch.nn.ReLU))]
    assert acts(gelu) == [torch.nn.GELU] * 3 and acts(relu) == [torch.nn.ReLU] * 3
    assert {k: v.shape for k, v in gelu.state_dict().items()} == {k: v.shape for k, v in relu.state_dict().items()}
    relu.load_state_dict(gelu.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(relu.eval()(x), gelu.eval()(x))  # another function of the same weights
    with pytest.raises(BackboneError, match="stem_act: 'tanh' is not one of gelu, relu, gelu_nhwc"):
        ConvStem(patch_size=8, stem_act="tanh")


def test_gelu_on_the_nhwc_view_is_gelu_to_float_rounding_and_keeps_channels_last(monkeypatch):
    """`stem_act: gelu_nhwc` is GELU computed on a channels-last activation's NHWC-contiguous view: the
    same function (to erf's float rounding), the same layout out, the same gradient."""
    x = torch.randn(4, 16, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    y, y_ref = STEM_ACTS["gelu_nhwc"]()(x), torch.nn.GELU()(ref)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g), y_ref.backward(g)
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=1e-5)
    plain = torch.randn(3, 5)  # not channels-last: plain GELU
    assert torch.equal(STEM_ACTS["gelu_nhwc"]()(plain), torch.nn.GELU()(plain))
    seen = []  # the kernel gets the dense NHWC view (plain GELU hands it the channels-last, non-contiguous tensor)
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda t, approximate="none": seen.append(t.is_contiguous()) or t)
    STEM_ACTS["gelu_nhwc"]()(x.detach()), torch.nn.GELU()(x.detach())
    assert seen == [True, False]


def test_stem_widths_sets_each_conv_and_is_checked():
    """`stem_widths` gives every stem conv its width (the last one the embedding width): the full-resolution
    conv's width alone, which `stem_width`'s doubling cannot."""
    net = create_backbone("udaflow_vit_tiny3", stem_widths=[8, 32, 64, 96])
    convs = [m for m in net.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 32), (32, 64), (64, 96)]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    default = create_backbone("udaflow_vit_tiny3", stem_widths=[16, 32, 64, 96])  # the registered widths, spelled out
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in create_backbone("udaflow_vit_tiny3").state_dict().items()}
    for bad in ([8, 32, 96], [8, 32, 64, 128], [0, 32, 64, 96], [], 96, [8.5, 32, 64, 96], [True, 32, 64, 96]):
        with pytest.raises(BackboneError, match=r"stem_widths: a list of 4 whole widths ending in embed_dim 96, not "):
            create_backbone("udaflow_vit_tiny3", stem_widths=bad)
    with pytest.raises(BackboneError, match="stem_width or stem_widths, not both"):  # the name's own stem_width yields; a user's does not
        create_backbone("udaflow_vit_tiny3", stem_widths=[8, 32, 64, 96], stem_width=12)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


@pytest.mark.parametrize("content", ["pickle", "garbage", "bad_safetensors"])
def test_foreign_weights_files_are_one_clear_error_and_never_run(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / ("w.safetensors" if content == "bad_safetensors" else "w.pt")
    if content == "pickle":
        torch.save({"blocks.0.attn.qkv.weight": _Payload()}, path)
    elif content == "garbage":
        path.write_bytes(b"not weights at all")
    else:
        path.write_bytes((100).to_bytes(8, "little") + b"{truncated")
    with pytest.raises(BackboneError, match=str(path)):
        create_backbone("udaflow_vit_micro", pretrained=str(path))
    assert not (tmp_path / "PWNED").exists()


def test_a_weights_file_lacking_some_of_the_backbone_s_tensors_is_refused(tmp_path):
    """strict=False alone loaded a file of half the blocks and left the rest at their random start, without a word."""
    state = create_backbone("udaflow_vit_micro").state_dict()
    path = tmp_path / "part.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.1.")} | {"head.weight": torch.zeros(3, 32)}, path)
    missing = [k for k in state if k.startswith("blocks.1.")]
    with pytest.raises(BackboneError) as err:
        create_backbone("udaflow_vit_micro", pretrained=str(path))
    assert str(err.value).startswith(f"{path}: {len(missing)} of backbone 'udaflow_vit_micro''s {len(state)} tensors are not in the file "
                                     f"(first: '{missing[0]}'")
    torch.save(state | {"head.weight": torch.zeros(3, 32)}, path)  # a tensor the backbone lacks (a classifier head) is left out
    assert create_backbone("udaflow_vit_micro", pretrained=str(path)).state_dict().keys() == state.keys()
