"""Mutated PNG, JPEG, PPM/PGM, TIFF, BMP, GIF and WebP bytes through load_image: each is refused with
InputError naming the file, or read as a `[1, 3, H, W]` float32 image with every value finite and in
0..1 and at most MAX_PIXELS pixels. Nothing else comes out, no case hangs, the file is unchanged.
10,000 seeded mutations (header fields, PNG chunks and JPEG/TIFF/BMP/GIF/PPM header values
rewritten, truncation, byte flips, spans cut, repeated or spliced from another format), plus
regression cases for what an earlier run found."""
import io
import random
import resource
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vae_fix.errors import InputError
from vae_fix.images import MAX_PIXELS, load_image
import fuzzing
from fuzzing import CASE_SECONDS, deadline

CASES = 10_000
INTS = [0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 6000, 6400, 40_000_000,
        0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
PPM_TOKENS = [b"0", b"-1", b"1", b"65535", b"65536", b"99999999999", b"1e3", b"0x10", b"#x", b"", b"6000", b"2147483648"]
TIFF_TAGS = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 338, 339}


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bases():
    """(suffix, bytes) of small valid images in every format and several modes."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((16, 24, 3)) * 255).astype(np.uint8))
    rgba = Image.fromarray((rng.random((16, 24, 4)) * 255).astype(np.uint8))
    grey16 = Image.fromarray((np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16))
    floats = Image.fromarray(np.linspace(-2, 3, 16 * 24).reshape(16, 24).astype(np.float32), mode="F")
    frame2 = rgb.rotate(90)
    return [
        (".png", encoded(rgb, "PNG")), (".png", encoded(rgba, "PNG")), (".png", encoded(rgb.convert("P"), "PNG")),
        (".png", encoded(grey16, "PNG")), (".png", encoded(rgb.convert("1"), "PNG")),
        (".png", encoded(rgb, "PNG", save_all=True, append_images=[frame2])),  # APNG
        (".jpg", encoded(rgb, "JPEG")), (".jpg", encoded(rgb, "JPEG", progressive=True)),
        (".jpg", encoded(rgb.convert("L"), "JPEG")), (".jpg", encoded(rgb.convert("CMYK"), "JPEG")),
        (".ppm", encoded(rgb, "PPM")), (".pgm", encoded(rgb.convert("L"), "PPM")), (".pgm", encoded(grey16, "PPM")),
        (".ppm", b"P3\n2 2\n255\n" + b" ".join(b"%d" % v for v in range(12)) + b"\n"),
        (".tif", encoded(rgb, "TIFF")), (".tif", encoded(rgb, "TIFF", compression="tiff_lzw")),
        (".tif", encoded(floats, "TIFF")), (".tif", encoded(grey16, "TIFF")), (".tif", encoded(rgb.convert("CMYK"), "TIFF")),
        (".bmp", encoded(rgb, "BMP")), (".bmp", encoded(rgb.convert("P"), "BMP")),
        (".gif", encoded(rgb.convert("P"), "GIF")), (".gif", encoded(rgb, "GIF", save_all=True, append_images=[frame2])),
        (".webp", encoded(rgb, "WEBP")), (".webp", encoded(rgba, "WEBP", lossless=True)),
    ]


def png_chunks(data: bytes):
    """(offset, length, type) of each chunk after the signature, as far as the lengths hold."""
    out, at = [], 8
    while at + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[at:at + 8])
        out.append((at, n, kind))
        at += 12 + n
    return out


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def mutate_png(rng: random.Random, data: bytes) -> bytes:
    chunks = png_chunks(data)
    at, n, kind = rng.choice(chunks)
    body = data[at + 8:at + 8 + n]
    how = rng.randrange(6)
    if how == 0 and kind == b"IHDR":  # a header field rewritten, CRC kept valid
        b = bytearray(body)
        field = rng.choice([(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1)])
        b[field[0]:sum(field)] = (rng.choice(INTS) % 256 ** field[1]).to_bytes(field[1], "big")
        new = chunk(kind, bytes(b))
    elif how == 1:  # the body flipped, CRC kept valid (corrupt zlib, palette, ...)
        b = bytearray(body or b"\0")
        b[rng.randrange(len(b))] = rng.randrange(256)
        new = chunk(kind, bytes(b))
    elif how == 2:  # the length field lies
        new = struct.pack(">I", rng.choice(INTS)) + data[at + 4:at + 12 + n]
    elif how == 3:  # dropped or repeated
        new = b"" if rng.random() < 0.5 else data[at:at + 12 + n] * 2
    elif how == 4:  # an odd chunk inserted before it
        new = rng.choice([chunk(b"tEXt", b"k\0" + b"v" * 5000), chunk(b"iCCP", b"p\0\0" + rng.randbytes(40)),
                          chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * 2_000_000)), chunk(b"PLTE", b"\0" * 3),
                          chunk(b"tRNS", b"\xff" * 300), chunk(b"acTL", b"\0\0\0\x05\0\0\0\0"),
                          chunk(b"IDAT", zlib.compress(b"\0" * 100_000)), chunk(b"eXIf", b"MM\0*" + rng.randbytes(20))]) \
            + data[at:at + 12 + n]
    else:  # the type renamed, CRC kept valid
        new = chunk(rng.choice([b"IDAT", b"IEND", b"IHDR", b"PLTE", b"iDOT", b"fdAT", b"xxxx"]), body)
    return data[:at] + new + data[at + 12 + n:]


def mutate_jpeg(rng: random.Random, data: bytes) -> bytes:
    frames = [i for i in range(len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)]
    if not frames or rng.random() < 0.3:  # any marker segment's length rewritten
        marks = [i for i in range(2, len(data) - 4) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE]
        i = rng.choice(marks)
        return data[:i + 2] + (rng.choice(INTS) % 65536).to_bytes(2, "big") + data[i + 4:]
    i = rng.choice(frames)  # SOF: length, precision, height, width, components
    offset, size = rng.choice([(4, 1), (5, 2), (7, 2), (9, 1), (10, 1), (11, 1), (12, 1)])
    return data[:i + offset] + (rng.choice(INTS) % 256 ** size).to_bytes(size, "big") + data[i + offset + size:]


def mutate_tiff(rng: random.Random, data: bytes) -> bytes:
    end = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(end + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return data
    count = struct.unpack(end + "H", data[ifd:ifd + 2])[0]
    entries = [ifd + 2 + 12 * k for k in range(count) if ifd + 14 + 12 * k <= len(data)]
    wanted = [e for e in entries if struct.unpack(end + "H", data[e:e + 2])[0] in TIFF_TAGS]
    e = rng.choice(wanted or entries)
    offset, size = rng.choice([(2, 2), (4, 4), (8, 4), (8, 2)])  # type, count, value/offset
    return data[:e + offset] + struct.pack(end + ("I" if size == 4 else "H"), rng.choice(INTS) % 256 ** size) + \
        data[e + offset + size:]


def mutate_ppm(rng: random.Random, data: bytes) -> bytes:
    """Width, height or maxval of a PPM/PGM header replaced by a hostile token."""
    tokens, at = [], 0
    for _ in range(4):
        while data[at:at + 1].isspace():
            at += 1
        start = at
        while at < len(data) and not data[at:at + 1].isspace():
            at += 1
        tokens.append(data[start:at])
    tokens[rng.randrange(1, 4)] = rng.choice(PPM_TOKENS)
    return b" ".join(tokens) + data[at:]


FIELDS = {".bmp": [(2, 4), (10, 4), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2), (30, 4), (34, 4), (46, 4)],
          ".gif": [(6, 2), (8, 2), (10, 1), (13, 2), (16, 2), (18, 2), (20, 2)],
          ".webp": [(4, 4), (16, 4), (20, 1), (21, 4), (24, 2), (26, 2), (28, 4)]}


def mutate(rng: random.Random, suffix: str, data: bytes, other: bytes) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # format-aware: header fields and chunk structure
        if suffix == ".png":
            return mutate_png(rng, data)
        if suffix == ".jpg":
            return mutate_jpeg(rng, data)
        if suffix == ".tif":
            return mutate_tiff(rng, data)
        if suffix in (".ppm", ".pgm"):
            return mutate_ppm(rng, data)
        at, size = rng.choice(FIELDS[suffix])
        order = "little" if suffix != ".gif" or rng.random() < 0.9 else "big"
        return data[:at] + (rng.choice(INTS) % 256 ** size).to_bytes(size, order) + data[at + size:]
    if kind == 1:  # a hostile 2- or 4-byte value anywhere in the first 64 bytes
        size = rng.choice([2, 4])
        at = rng.randrange(min(64, len(data) - size))
        return data[:at] + (rng.choice(INTS) % 256 ** size).to_bytes(size, rng.choice(["little", "big"])) + \
            data[at + size:]
    if kind == 2:
        return data[:rng.randrange(len(data))]
    if kind == 3:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b) if rng.random() < 0.5 else min(len(b), 100))] = rng.randrange(256)
        return bytes(b)
    at = rng.randrange(len(data))
    if kind == 4:  # a span cut out or repeated
        span = rng.randint(1, 256)
        return data[:at] + data[at + span:] if rng.random() < 0.5 else data[:at + span] + data[at:]
    return data[:at] + other[rng.randrange(len(other)):]  # another format's tail spliced on


def valid_image(img) -> None:
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.dim() == 4, (type(img), img)
    b, c, h, w = img.shape
    assert b == 1 and c == 3 and h >= 1 and w >= 1 and h * w <= MAX_PIXELS, img.shape
    assert bool(img.isfinite().all()) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0, \
        (float(img.min()), float(img.max()))


def outcome(path) -> str:
    return fuzzing.outcome(path, lambda: load_image(path), valid_image, max_message=1000)


def test_mutated_images_give_only_the_clear_error_or_a_valid_image(bases, tmp_path):
    rng = random.Random(99)
    counts = {"read": 0, "refused": 0}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(CASES):
        suffix, data = bases[i % len(bases)]
        path = tmp_path / f"mutant{suffix}"
        path.write_bytes(mutate(rng, suffix, data, rng.choice(bases)[1]))
        try:
            counts[outcome(path)] += 1
        except (AssertionError, pytest.fail.Exception) as e:
            raise AssertionError(f"case {i} (base {i % len(bases)}, {suffix}): {e}") from None
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - grown  # KiB on Linux
    assert counts["refused"] > CASES // 4 and counts["read"] > CASES // 4, counts
    assert grown < 2_000_000, f"peak memory grew by {grown} KiB"


def test_every_base_image_reads(bases, tmp_path):
    for k, (suffix, data) in enumerate(bases):
        path = tmp_path / f"base{k}{suffix}"
        path.write_bytes(data)
        assert outcome(path) == "read", k


def tiff_with_tag(data: bytes, tag: int, value: int) -> bytes:
    """A little-endian TIFF with the (short or long) value of `tag` in its first IFD replaced."""
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        if struct.unpack("<H", data[e:e + 2])[0] == tag:
            kind = struct.unpack("<H", data[e + 2:e + 4])[0]
            return data[:e + 8] + struct.pack("<H2x" if kind == 3 else "<I", value) + data[e + 12:]
    raise AssertionError(f"no tag {tag}")


def test_a_tiff_whose_strips_cover_16_of_its_rows_is_refused_before_decoding(bases, tmp_path):
    # Before: a 1.3 KB file read as a 24 x 1,572,864 image, black below row 16 (2 s, ~600 MB).
    path = tmp_path / "tall.tif"
    path.write_bytes(tiff_with_tag(bases[14][1], 257, 1_572_864))
    with pytest.raises(InputError, match=r"tall\.tif.*covers 384 of its 24x1572864 pixels"), deadline(CASE_SECONDS):
        load_image(path)


def test_nan_in_a_float_tiff_is_refused(tmp_path):
    # Before: read, with the NaN kept (np.clip keeps NaN), so it reached the VAE.
    values = np.linspace(-2, 3, 16 * 24).reshape(16, 24).astype(np.float32)
    values[3, 5] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(InputError, match=r"nan\.tif.*1 of its float pixels are NaN"):
        load_image(path)
    values[3, 5] = np.inf  # infinities are clipped to white like any value above 1
    Image.fromarray(values, mode="F").save(path)
    assert float(load_image(path)[0, :, 3, 5].min()) == 1.0


def test_a_gif_frame_smaller_than_its_screen_still_reads(bases, tmp_path):
    data = bases[21][1]
    path = tmp_path / "wide.gif"
    path.write_bytes(data[:6] + (48).to_bytes(2, "little") + data[8:])  # logical screen 48 wide, frame 24
    img = load_image(path)
    assert img.shape == (1, 3, 16, 48) and bool(img.isfinite().all())
