"""Images a user (or an attacker) may hand the CLI: each is read correctly or refused by name with
exit 2 and no traceback, before a large allocation."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vae_fix.errors import InputError
from vae_fix.images import MAX_PIXELS, load_image
from run_cli import run_cli


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` (a few hundred bytes: a decompression bomb's promise)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name,content,fragment", [
    ("bomb.png", png_header_only(12_500, 12_500), "pixels"),
    ("truncated.png", png_header_only(64, 64)[:30], "not a readable image"),
    ("broken.png", png_header_only(64, 64), "not a readable image"),
    ("bad.ppm", b"P6\n-5 7\n255\n" + b"\0" * 10, "not a readable image"),
    ("garbage.tif", b"II*\x00" + b"\xff" * 60, "not a readable image"),
    ("empty.png", b"", "not a readable image"),
])
def test_hostile_images_are_refused_by_name(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=fragment) as e:
        load_image(path)
    assert name in str(e.value)
    r = run_cli("stats", "--vae", "nowhere.safetensors", "--image", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    img = load_image(path)
    assert img.shape == (1, 3, 64, 64)
    assert float(img.min()) == 0.0 and float(img.max()) == pytest.approx(1.0)
    assert float(img.mean()) == pytest.approx(0.5, abs=0.01)  # white everywhere before


def test_the_pixel_limit_is_checked_before_decoding():
    assert MAX_PIXELS >= 2048 * 2048 * 4  # large images are inspected; bombs are not
