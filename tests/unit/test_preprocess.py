"""The model's own input: a timm backbone with a pretrained config brings its size, resize/crop and
normalisation; udaflow's backbones take data.image_size and 0.5/0.5."""

import numpy as np
import pytest
import torch
from PIL import Image

from udaflow.data.datasets import decode_image
from udaflow.models import ImageClassifier, build_classifier
from udaflow.models import packaged
from udaflow.models.preprocess import ImageSpec, resolve


def test_the_spec_comes_from_timm_when_the_backbone_has_a_pretrained_config():
    vit = resolve("vit_small_patch16_224", {}, 32)
    assert (vit.size, vit.interpolation, vit.crop_pct, vit.mean, vit.std) == (224, "bicubic", 0.9, (0.5,) * 3, (0.5,) * 3)
    assert "vit_small_patch16_224" in vit.origin
    assert resolve("vit_tiny_patch16_224", {"img_size": 64}, 32).size == 64  # the built model's size beats the config's 224
    resnet = resolve("resnet18", {}, 32)
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.crop_pct == 0.95
    squash = resolve("dm_nfnet_f0", {}, 32)  # a squash model: its crop in the decoded file's name and the run's input line
    assert squash.crop_mode == "squash" and squash.variant.endswith("-squash") and "aspect ratio not kept" in squash.describe()
    assert vit.crop_mode == "center" and vit.variant == "bicubic-crop0.9"  # unchanged: decoded files cached before are reused
    own = resolve("udaflow_vit_tiny", {}, 48)
    assert own == ImageSpec(48) and own.variant == ""  # params.yaml decides; decoded as before


@pytest.mark.parametrize("crop_mode, crop_pct", [("center", 0.9), ("squash", 0.9), ("squash", 1.0), ("border", 1.0), ("border", 0.9)])
def test_decoding_with_a_crop_matches_timms_eval_transform(tmp_path, crop_mode, crop_pct):
    """Pixel for pixel, in each of timm's crop modes (until 2026-12-05 squash and border models, 131 + 6 of timm's
    pretrained configs, were decoded as centre crops: up to 121/255 off)."""
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    mean = (0.485, 0.456, 0.406)  # border pads with the mean colour
    for i, (w, h) in enumerate([(120, 80), (50, 90), (64, 64), (300, 301), (283, 221), (20, 200)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        spec = ImageSpec(64, "bicubic", crop_pct, mean, (0.5,) * 3, crop_mode=crop_mode)
        ours = decode_image(path, spec)
        transform = create_transform(64, interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode, is_training=False,
                                     mean=mean, std=(0.5,) * 3)
        pil_steps = transform.transforms[:2]  # Resize (or ResizeKeepRatio), CenterCrop (or CenterCropOrPad); then ToTensor, Normalize
        with Image.open(path) as img:
            theirs = np.asarray(pil_steps[1](pil_steps[0](img.convert("RGB")))).transpose(2, 0, 1)
        assert ours.shape == (3, 64, 64) and np.array_equal(ours, theirs), (w, h)
    # no crop: straight to the square, as udaflow always did
    assert decode_image(tmp_path / "0.png", 32).shape == (3, 32, 32)


def _portrait() -> Image.Image:
    yy, xx = np.mgrid[0:60, 0:36]  # a smooth, asymmetric portrait: 36 wide, 60 high
    return Image.fromarray(np.stack([xx * 7, yy * 4, (xx + yy) * 2], -1).astype(np.uint8))


def _exif(orientation: int):
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("orientation, stored_as", [
    (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180), (4, Image.Transpose.FLIP_TOP_BOTTOM),
    (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_90), (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_270),
])
def test_a_cameras_exif_orientation_is_applied_before_resizing(tmp_path, fmt, orientation, stored_as):
    """A phone stores a portrait photo as landscape pixels plus an EXIF Orientation tag: training, evaluation
    and the served model see it upright, as a viewer shows it (until 2026-12-06 they saw the stored pixels)."""
    from udaflow.data.datasets import to_model_pixels

    upright = _portrait()
    tagged, plain = tmp_path / f"tagged.{fmt}", tmp_path / f"plain.{fmt}"
    stored = upright.transpose(stored_as)
    stored.save(tagged, exif=_exif(orientation), **({"quality": 100} if fmt == "jpeg" else {}))
    upright.save(plain, **({"quality": 100} if fmt == "jpeg" else {}))
    ours, expected = decode_image(tagged, 32).astype(int), decode_image(plain, 32).astype(int)
    as_stored = to_model_pixels(stored, 32).astype(int)  # the pixels as stored, no tag: what was decoded before
    if fmt == "png":  # lossless: the same pixels
        assert np.array_equal(ours, expected)
    else:  # JPEG re-encodes a turned image differently: close, not equal
        assert np.abs(ours - expected).mean() < 2
    assert np.abs(as_stored - expected).mean() > 20
    served = packaged._decode(tagged.read_bytes(), "row 0", ImageSpec(32))  # the file's bytes, as a client sends them
    assert np.array_equal(served, decode_image(tagged, 32))


def test_unreadable_exif_decodes_the_pixels_as_stored(tmp_path, monkeypatch):
    """A truncated EXIF block, or one PIL cannot parse at all, decodes as stored: the image passed ingest's
    decode check, so training must not stop on it."""
    from udaflow.data.datasets import to_model_pixels

    img = _portrait()
    truncated, tagged = tmp_path / "truncated.jpeg", tmp_path / "tagged.png"
    img.save(truncated, quality=100, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff")
    img.save(tagged, exif=_exif(6))
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # PIL's own, as it opens the file
        with Image.open(truncated) as opened:
            expected = to_model_pixels(opened.copy(), 32)  # copy() carries no EXIF: the stored pixels
        assert np.array_equal(decode_image(truncated, 32), expected)
    assert not np.array_equal(decode_image(tagged, 32), to_model_pixels(img, 32))  # a readable tag turns it
    monkeypatch.setattr(Image.Image, "getexif", lambda self: (_ for _ in ()).throw(SyntaxError("not a TIFF file")))
    assert np.array_equal(decode_image(tagged, 32), to_model_pixels(img, 32))  # an unreadable one: as stored


def test_a_broken_image_still_fails_to_decode(tmp_path):
    """Reading the orientation decodes a PNG's pixels first (its EXIF may follow them): a broken pixel stream
    is still an error, for training (decode_image) and for the served model (InputError naming the row)."""
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 200: idat + 240] = bytes(40)
    path.write_bytes(bytes(data))
    with pytest.raises((OSError, SyntaxError, ValueError)):
        decode_image(path, 32)
    with pytest.raises(packaged.InputError, match="row 3: not an image file PIL can decode"):
        packaged._decode(bytes(data), "row 3", ImageSpec(32))


def test_the_pixel_digest_is_the_picture_the_model_sees_not_the_stored_bytes():
    """`pixel_digest`: one picture however it is stored (grey as L or RGB, opaque alpha, a palette), and
    another for a single changed pixel or another size."""
    from udaflow.data.pixels import pixel_digest

    grey = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    l_img = Image.fromarray(grey, "L")
    same = [l_img.convert("RGB"), l_img.convert("RGBA"), l_img.convert("P"), l_img.convert("LA")]
    assert {pixel_digest(img) for img in same} == {pixel_digest(l_img)}
    changed = grey.copy()
    changed[3, 4] ^= 1
    assert pixel_digest(Image.fromarray(changed, "L")) != pixel_digest(l_img)
    assert pixel_digest(Image.fromarray(np.zeros((20, 24), np.uint8), "L")) != pixel_digest(Image.fromarray(np.zeros((24, 20), np.uint8), "L"))


def test_a_large_images_sketch_is_settled_by_every_pixel(tmp_path):
    """From 256 px on its shorter side an image is digested from box averages (a 12 MP photo's full digest tripled
    its validation); two pictures with one sketch are told apart by their exact digests, copies are not."""
    from udaflow.data.pixels import EXACT, SKETCH, file_digest, pixel_digest, settle

    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    photo[0, :2] = 100
    twin = photo.copy()
    twin[0, 0, 0], twin[0, 1, 0] = 101, 99  # two pixels of one 2 x 2 box: its average, and so the sketch, unchanged
    files = {}
    for name, arr, fmt in (("a.png", photo, "PNG"), ("copy.bmp", photo, "BMP"), ("twin.png", twin, "PNG")):
        files[name] = tmp_path / name
        Image.fromarray(arr).save(files[name], format=fmt)
    sketches = [file_digest(files[n]) for n in ("a.png", "copy.bmp", "twin.png")]
    assert all(d.startswith(SKETCH) for d in sketches) and len(set(sketches)) == 1  # one sketch for the three
    settled = settle(sketches, [files[n] for n in ("a.png", "copy.bmp", "twin.png")])
    assert all(d.startswith(EXACT) for d in settled) and settled[0] == settled[1] != settled[2]
    assert settle([sketches[0], None], [files["a.png"], None]) == [sketches[0], None]  # a sketch no other repeats stays
    assert pixel_digest(Image.fromarray(photo[:200])).startswith(EXACT)  # under 256 px a side: exact at once


def test_per_channel_normalisation_travels_with_the_registered_model(tmp_path):
    clf = build_classifier("resnet18", 3)
    assert clf.input_mean == pytest.approx((0.485, 0.456, 0.406))
    model = ImageClassifier(clf, ("a", "b", "c")).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = clf((x - torch.tensor(clf.input_mean).view(1, 3, 1, 1)) / torch.tensor(clf.input_std).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-6)
    folder = packaged.save(model, tmp_path / "m", "resnet18", {}, 224)
    config = packaged.read_config(folder)
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406]) and config["image_size"] == 224
    again = packaged.load(folder)
    assert torch.allclose(again(x), model(x), atol=1e-6)
    # udaflow's own backbones keep one value (registered models of earlier versions load the same way)
    own = ImageClassifier(build_classifier("udaflow_vit_micro", 3), ("a", "b", "c"))
    assert own.mean.dim() == 0 and packaged.read_config(packaged.save(own, tmp_path / "o", "udaflow_vit_micro", {}, 32))["mean"] == 0.5


def test_augmentation_scales_with_the_input_size():
    from udaflow.config import AugmentConfig
    from udaflow.data.transforms import VIEWS, augment_view, pixels

    cfg = AugmentConfig(color=False, invert=0.0)  # the shift alone
    for size, expected in ((32, 3), (64, 6), (224, 21), (97, 9)):
        x = torch.zeros(64, 3, size, size, dtype=torch.uint8)
        x[:, :, size // 2, size // 2] = 255  # one bright pixel in the middle
        assert pixels(cfg.translate, x) == expected
        out = augment_view(x, cfg, torch.Generator().manual_seed(0), "default")
        where = (out[:, 0] == 255).nonzero()[:, 1:] - size // 2  # (64, 2) offsets of the pixel
        assert int(where.abs().max()) == expected  # moved up to the same share of the picture
        for view in VIEWS:
            assert augment_view(x, AugmentConfig(), torch.Generator().manual_seed(0), view).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_the_shift_is_a_replicate_pad_then_a_crop_in_the_images_own_dtype(dtype):
    """transforms.shift against a plain re-computation, image by image: pad each border with its edge pixels
    by t, then crop H x W at (dy, dx), the offsets drawn as dx then dy from the generator."""
    import torch.nn.functional as F

    from udaflow.data.transforms import shift

    images = torch.randint(0, 256, (9, 3, 11, 14), generator=torch.Generator().manual_seed(2)).to(dtype)
    for t in (1, 3, 6):
        out = shift(images, t, torch.Generator().manual_seed(t))
        draws = torch.Generator().manual_seed(t)
        dx, dy = torch.randint(0, 2 * t + 1, (9,), generator=draws), torch.randint(0, 2 * t + 1, (9,), generator=draws)
        assert out.dtype == dtype and out.shape == images.shape
        for i in range(9):
            padded = F.pad(images[i : i + 1].float(), (t, t, t, t), mode="replicate")[0]  # (3, H + 2t, W + 2t)
            assert torch.equal(out[i].float(), padded[:, dy[i] : dy[i] + 11, dx[i] : dx[i] + 14]), (t, i)


@pytest.mark.parametrize("view", ["weak", "default", "strong"])
def test_augmentation_computes_where_the_images_are_and_draws_on_the_cpu_generator(view):
    """The engine augments a GPU run's batch on the GPU. The meta device stands in for one here: an operand
    left on the CPU fails as it would on CUDA ("not on the expected device"), and the draws stay on the
    run's CPU generator, as many as on the CPU (tests/gpu compares the pixels on a real GPU)."""
    from udaflow.config import AugmentConfig
    from udaflow.data.transforms import augment_view

    cfg = AugmentConfig(rotate=10, scale=0.1, strong_rotate=20, strong_shear=0.2)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    on_cpu, elsewhere = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment_view(images, cfg, on_cpu, view)
    out = augment_view(images.to("meta"), cfg, elsewhere, view)
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.uint8, images.shape)
    assert torch.equal(on_cpu.get_state(), elsewhere.get_state())


@pytest.mark.parametrize("view", ["weak", "default", "strong"])
@pytest.mark.parametrize("cfg_args", [{}, {"rotate": 10, "scale": 0.1, "strong_rotate": 20, "strong_shear": 0.2}])
def test_a_rank_augments_its_own_rows_as_the_whole_batch_would(view, cfg_args):
    """Under torchrun each rank augments only its rows of the global batch, drawing the numbers for the
    whole batch (RowDraws): the pixels of those rows in one process, and the generator where one process leaves it."""
    from udaflow.config import AugmentConfig
    from udaflow.data.transforms import RowDraws, augment_view

    cfg = AugmentConfig(**cfg_args)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole_gen = torch.Generator().manual_seed(3)
    whole = augment_view(images, cfg, whole_gen, view)
    for rows in (slice(0, 4), slice(4, 8), slice(2, 4)):
        gen = torch.Generator().manual_seed(3)
        part = augment_view(images[rows], cfg, RowDraws(gen, 8, rows), view)
        assert torch.equal(part, whole[rows]), rows
        assert torch.equal(gen.get_state(), whole_gen.get_state())
    with pytest.raises(ValueError, match="4 rows of 8 given a batch of 8"):
        augment_view(images, AugmentConfig(), RowDraws(torch.Generator(), 8, slice(0, 4)), "default")
