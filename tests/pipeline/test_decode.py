"""Decode stage, called directly (no cluster): modes, EXIF, padding geometry, error rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from pipeline.columns import MissingColumnsError
from pipeline.decode import (
    PAD_COLOUR,
    DecodeConfig,
    decode_batch,
    expand_frames,
    prepare,
    square_resize,
    to_rgb,
)
from pipeline.predict import tensor_column
from tests.helpers import noise_image

SMALL = DecodeConfig(image_size=64)


def _batch(paths: list) -> pa.Table:
    return pa.table({"id": [p.name for p in paths], "source_uri": [str(p) for p in paths]})


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_square_resize_centres_the_image_on_the_clip_mean():
    red = Image.new("RGB", (300, 100), (255, 0, 0))
    out = np.asarray(square_resize(red, 30, PAD_COLOUR))
    assert out.shape == (30, 30, 3)
    # Side 300: pasted at (0, 100), so rows 0-9 and 20-29 are padding, 10-19 the image.
    assert tuple(out[2, 15]) == PAD_COLOUR and tuple(out[27, 15]) == PAD_COLOUR
    assert tuple(out[15, 15]) == (255, 0, 0)
    assert tuple(out[15, 0]) == (255, 0, 0) and tuple(out[15, 29]) == (255, 0, 0)


def test_square_resize_matches_the_design_recipe():
    img = noise_image(77, 40, seed=3)
    side = 77
    expected = Image.new("RGB", (side, side), PAD_COLOUR)
    expected.paste(img, ((side - 77) // 2, (side - 40) // 2))
    expected = expected.resize((56, 56), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(square_resize(img, 56, PAD_COLOUR)),
                                  np.asarray(expected))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    img = noise_image(40, 30, seed=1, mode="L" if mode in ("I;16", "I", "F", "1") else "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 16)  # 12-bit range
    else:
        img = img.convert(mode)
    assert img.mode == mode
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 30)
    arr = np.asarray(out)
    assert arr.max() > 200  # not collapsed to black
    if mode == "I;16":
        assert arr.min() < 50  # stretched, not clipped to white as Pillow's convert would


def test_alpha_is_composited_over_the_pad_colour():
    clear = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert tuple(np.asarray(to_rgb(clear))[5, 5]) == PAD_COLOUR
    opaque = Image.new("LA", (10, 10), (200, 255))
    assert tuple(np.asarray(to_rgb(opaque))[5, 5]) == (200, 200, 200)
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    assert tuple(np.asarray(to_rgb(pal))[5, 5]) == PAD_COLOUR


def test_decode_batch_files_in_many_formats(tmp_path):
    paths = [
        _save(noise_image(120, 80, mode="CMYK"), tmp_path / "cmyk.jpg", quality=90),
        _save(noise_image(50, 70, mode="LA"), tmp_path / "la.png"),
        _save(noise_image(64, 64).quantize(16), tmp_path / "p.png"),
        _save(Image.fromarray(np.arange(0, 60 * 40, dtype=np.uint16).reshape(40, 60)),
              tmp_path / "gray16.png"),
        _save(noise_image(90, 30, mode="RGBA"), tmp_path / "rgba.webp"),
    ]
    out = decode_batch(_batch(paths), SMALL)
    assert out.column("error").null_count == out.num_rows, out.column("error").to_pylist()
    assert out.column("width").to_pylist() == [120, 50, 64, 60, 90]
    assert out.column("height").to_pylist() == [80, 70, 64, 40, 30]
    pixels = tensor_column(out, "image")
    assert pixels.shape == (5, 64, 64, 3) and pixels.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_batch(_batch([path]), DecodeConfig(image_size=200))
    assert out.column("width")[0].as_py() == 100 and out.column("height")[0].as_py() == 200
    pixels = tensor_column(out, "image")[0]
    # After the clockwise turn the red half is on top.
    assert pixels[40, 100, 0] > 200 and pixels[40, 100, 2] < 60
    assert pixels[160, 100, 2] > 200 and pixels[160, 100, 0] < 60


@pytest.mark.parametrize("orientation", [None, 1, 3])
def test_prepare_follows_the_recipe_and_leaves_its_input_alone(tmp_path, orientation):
    """Upright RGB images skip exif_transpose's and convert's copies; the pixels are still
    those of the full recipe (orient, convert, pad, resize), and the input is not modified."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    path = _save(noise_image(90, 60, seed=4), tmp_path / "a.jpg", exif=exif, quality=95)
    img = Image.open(path)
    img.load()
    before = np.asarray(img).copy()
    expected = square_resize(ImageOps.exif_transpose(img).convert("RGB"), 48, PAD_COLOUR)
    arr, width, height = prepare(img, DecodeConfig(image_size=48))
    np.testing.assert_array_equal(arr, np.asarray(expected))
    assert (width, height) == (90, 60)  # 180 degrees (3) keeps the size
    np.testing.assert_array_equal(np.asarray(img), before)


def test_bad_files_become_error_rows_in_order(tmp_path):
    good = _save(noise_image(40, 40), tmp_path / "a_good.png")
    corrupt = tmp_path / "b_corrupt.jpg"
    corrupt.write_bytes(b"this is not an image")
    data = io.BytesIO()
    noise_image(300, 300).save(data, format="JPEG")
    truncated = tmp_path / "c_truncated.jpg"
    truncated.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    missing = tmp_path / "d_missing.png"
    good2 = _save(noise_image(30, 20), tmp_path / "e_good.png")
    out = decode_batch(_batch([good, corrupt, truncated, missing, good2]), SMALL)
    assert out.column("id").to_pylist() == [
        "a_good.png", "b_corrupt.jpg", "c_truncated.jpg", "d_missing.png", "e_good.png"
    ]
    assert out.column("error_stage").to_pylist() == [None, "decode", "decode", "read", None]
    errors = out.column("error").to_pylist()
    assert "UnidentifiedImageError" in errors[1]
    assert "FileNotFoundError" in errors[3]
    assert out.column("width").to_pylist()[4] == 30


def test_pixel_limit_makes_an_error_row_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (400, 300)), tmp_path / "big.png")
    out = decode_batch(_batch([path]), DecodeConfig(image_size=32, max_pixels=100_000))
    assert out.column("error_stage")[0].as_py() == "decode"
    assert "--max-pixels" in out.column("error")[0].as_py()


def test_decompression_bomb_is_an_error_row_not_an_oom(tmp_path):
    # 30000 x 30000 = 900 Mpx (2.7 GB as RGB) in a ~100 kB PNG.
    path = _save(Image.new("1", (30000, 30000)), tmp_path / "bomb.png", optimize=True)
    assert path.stat().st_size < 2_000_000
    out = decode_batch(_batch([path]), DecodeConfig(image_size=32))
    assert out.column("error_stage")[0].as_py() == "decode"
    assert "900000000 pixels" in out.column("error")[0].as_py()
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard restored


def test_multiband_16bit_tiff_falls_back_to_tifffile(tmp_path):
    import tifffile

    bands = (np.random.default_rng(0).random((4, 50, 70)) * 4000).astype(np.uint16)
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate")
    out = decode_batch(_batch([path]), SMALL)
    assert out.column("error")[0].as_py() is None
    assert (out.column("width")[0].as_py(), out.column("height")[0].as_py()) == (70, 50)


def test_expand_hook_gives_one_row_per_page(tmp_path):
    pages = [noise_image(40 + 10 * i, 30, seed=i) for i in range(3)]
    path = tmp_path / "three.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    good = _save(noise_image(20, 20), tmp_path / "single.png")
    out = decode_batch(_batch([path, good]), DecodeConfig(image_size=32, expand=expand_frames))
    assert out.column("id").to_pylist() == ["three.tif"] * 3 + ["single.png"]
    assert out.column("page").to_pylist() == [0, 1, 2, 0]
    assert out.column("width").to_pylist() == [40, 50, 60, 20]


def test_missing_columns_name_the_stage():
    with pytest.raises(MissingColumnsError, match="stage 'decode'.*source_uri"):
        decode_batch(pa.table({"id": ["x"]}), SMALL)


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--max-pixels"):
        DecodeConfig(max_pixels=0)
