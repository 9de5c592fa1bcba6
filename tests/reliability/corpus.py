"""The bad-input corpus: awkward files made on the spot, each with the outcome the job must give.

`write_image_corpus(root)` writes the caption job's files (good images among them) and returns
`{name: Expect}`; `write_document_corpus(root)` does the same for the OCR job (PDFs). An
`Expect` is either an answer (`stage=None`, optionally the size after EXIF orientation) or an
error row of `stage` whose `error` contains `cause`.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import noise_image

NON_UTF8_NAME = b"caf\xe9_latin1.jpg"  # Latin-1 bytes: not valid UTF-8
NON_UTF8_ID = "caf\\xe9_latin1.jpg"  # how the id shows the byte that is not UTF-8


@dataclass(frozen=True)
class Expect:
    kind: str  # what the file is, for the table in the README / report
    stage: str | None = None  # None: answered
    cause: str = ""  # substring of `error` when stage is set
    size: tuple[int, int] | None = None  # (width, height) when answered, if checked
    rows: int = 1  # output rows (documents: pages)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (correct CRCs) claiming width x height, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """Stored 320x160, EXIF Orientation 6 (rotate 90 degrees clockwise to display): 160x320."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(noise_image(320, 160, seed=11), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [noise_image(200, 150, seed=20 + i).convert("P") for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiff_bytes(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    img = noise_image(240, 180, seed=30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(img, "PNG", transparency=0)


def write_image_corpus(root: Path) -> dict[str, Expect]:
    """The caption job's files under `root` (created); keys are the ids a folder listing gives
    (the non-UTF-8 name as NON_UTF8_ID)."""
    root.mkdir(parents=True, exist_ok=True)
    good_jpeg = _save(noise_image(900, 600, seed=1), "JPEG", quality=90)
    good_png = _save(noise_image(640, 1000, seed=2), "PNG")
    ramp16 = (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300) % 65536).astype(np.uint16)
    ramp32 = np.linspace(-1.5, 3.0, 200 * 300, dtype=np.float32).reshape(200, 300)
    ramp32[0, 0] = np.nan
    files: dict[str, tuple[bytes, Expect]] = {
        "good_scene.jpg": (good_jpeg, Expect("good JPEG", size=(900, 600))),
        "good_scene.png": (good_png, Expect("good PNG", size=(640, 1000))),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) * 2 // 3],
                          Expect("truncated JPEG", "decode", "truncated")),
        "truncated.png": (good_png[: len(good_png) // 2],
                          Expect("truncated PNG", "decode", "truncated")),
        "zero_bytes.jpg": (b"", Expect("zero bytes", "decode", "empty file (0 bytes)")),
        "html_page.jpg": (b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
                          Expect("HTML saved as .jpg", "decode",
                                 "not an image: the file is HTML/XML text")),
        "one_pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
                          Expect("1x1 image", size=(1, 1))),
        "huge_header.png": (png_claiming(30000, 30000),
                            Expect("header claiming 30000x30000", "decode",
                                   "ImageTooLargeError: image is 30000x30000")),
        "depth16.tif": (tiff_bytes(ramp16), Expect("16-bit TIFF", size=(300, 200))),
        "float32.tif": (tiff_bytes(ramp32), Expect("float32 TIFF (with a NaN)", size=(300, 200))),
        "cmyk.jpg": (_save(noise_image(500, 300, seed=3).convert("CMYK"), "JPEG"),
                     Expect("CMYK JPEG", size=(500, 300))),
        "palette_alpha.png": (palette_with_transparency(),
                              Expect("palette PNG with transparency", size=(240, 180))),
        "exif_rotated.jpg": (exif_rotated_jpeg(),
                             Expect("EXIF-rotated JPEG (orientation 6)", size=(160, 320))),
        "animated.gif": (animated_gif(), Expect("animated GIF (3 frames)", size=(200, 150))),
        "bad_crc.png": (good_png[:29] + b"\x00\x00\x00\x00" + good_png[33:],
                        Expect("PNG with a bad header CRC", "decode", "damaged PNG data")),
        "wide_strip.png": (_save(noise_image(3000, 2, seed=4), "PNG"),
                           Expect("3000x2 strip", size=(3000, 2))),
        "trailing_junk.jpg": (good_jpeg + os.urandom(2048),
                              Expect("JPEG with 2 KB of junk appended", size=(900, 600))),
        "grey_alpha.png": (_save(noise_image(300, 300, seed=5, mode="LA"), "PNG"),
                           Expect("grey + alpha PNG", size=(300, 300))),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    expect = {name: e for name, (_, e) in files.items()}
    good = _save(noise_image(420, 380, seed=6), "JPEG")
    with open(os.path.join(os.fsencode(root), NON_UTF8_NAME), "wb") as f:
        f.write(good)
    expect[NON_UTF8_ID] = Expect("non-UTF-8 file name (Latin-1 byte 0xE9)", size=(420, 380))
    return expect


def pdf_bytes(pages: int, encrypt: bool = False) -> bytes:
    from fpdf import FPDF

    pdf = FPDF(unit="pt")
    pdf.set_font("Helvetica", size=24)
    for i in range(pages):
        pdf.add_page(format=(300, 400))
        pdf.cell(0, 40, f"Page {i + 1} of the corpus document")
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="user")
    return bytes(pdf.output())


def write_document_corpus(root: Path) -> dict[str, Expect]:
    """The OCR job's files under `root`: a good two-page PDF, an encrypted one, a corrupt one,
    a zero-byte PDF and a good PNG scan."""
    root.mkdir(parents=True, exist_ok=True)
    good = pdf_bytes(2)
    files = {
        "report.pdf": (good, Expect("good PDF (2 pages)", rows=2)),
        "locked.pdf": (pdf_bytes(1, encrypt=True),
                       Expect("encrypted PDF (user password)", "decode", "password")),
        "corrupt.pdf": (b"%PDF-1.7\n" + os.urandom(3000),
                        Expect("corrupt PDF (header, then junk)", "decode", "PdfiumError")),
        "cut.pdf": (good[: len(good) // 3], Expect("truncated PDF", "decode", "PdfiumError")),
        "scan.png": (_save(noise_image(600, 800, seed=7, mode="L"), "PNG"),
                     Expect("grey PNG scan", size=(600, 800))),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: e for name, (_, e) in files.items()}
