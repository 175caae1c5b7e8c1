"""Training images available offline, and seeded random crops of them.

Sources (`../shared/docs/training-data.md`): the colour photographs inside scikit-image's wheel
(read as files from its `data/` folder: nothing is imported or fetched) and the wallpapers of
Debian's `plasma-workspace-wallpapers` (photographs and artwork, up to 5120×2880), or any folder.
Some photographs are held out of training for evaluation (`HELD_OUT`); the data set says which.

Layouts: stored images `[3, H, W]` uint8 (kept small: at most `MAX_SIDE` px a side); batches
`[B, 3, S, S]` float32 in -1..1.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

SKIMAGE_COLOUR = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
                  "retina.jpg", "motorcycle_left.png", "color.png", "chessboard_RGB.png", "phantom.png")
WALLPAPERS = Path("/usr/share/wallpapers")
# Photographs never trained on: three scikit-image photos (fur, a cup, a rocket on a street) and two
# wallpaper photographs (a forest path, cups). Evaluation reports these.
HELD_OUT = ("chelsea", "coffee", "rocket", "Path", "ColorfulCups")
MAX_SIDE = 2048           # stored size bound: a 5120×2880 wallpaper is kept at 2048×1152 (7 MB)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 5120 * 2880 * 2  # a larger "wallpaper" is refused before decoding


def skimage_files() -> list[Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [folder / n for n in SKIMAGE_COLOUR if (folder / n).is_file()]


def wallpaper_files(root: Path = WALLPAPERS) -> list[Path]:
    """The largest image of each wallpaper (`<Name>/contents/images/<W>x<H>.<ext>`)."""
    files = []
    for d in sorted(root.glob("*/contents/images")) if root.is_dir() else []:
        sizes = [p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and "x" in p.stem]
        if sizes:
            files.append(max(sizes, key=lambda p: _area(p.stem)))
    return files


def _area(stem: str) -> int:
    w, _, h = stem.partition("x")
    return int(w) * int(h) if w.isdigit() and h.isdigit() else 0


def image_name(path: Path) -> str:
    """'chelsea' for skimage's chelsea.png, 'Path' for /usr/share/wallpapers/Path/contents/images/..."""
    return path.parts[-4] if len(path.parts) >= 4 and path.parts[-3] == "contents" else path.stem


def default_files() -> list[Path]:
    """Both default sources, or the clear error naming the missing one: without it the training set
    and the held-out photographs would silently differ from the study's."""
    photos, wallpapers = skimage_files(), wallpaper_files()
    missing = ([] if photos else ["scikit-image's photographs (pip install scikit-image)"]) + \
              ([] if wallpapers else [f"Debian's wallpapers in {WALLPAPERS} "
                                      "(apt-get install plasma-workspace-wallpapers)"])
    if missing:
        raise InputError("images", f"the default training set is incomplete: {' and '.join(missing)} not found",
                         "both sources installed, or your own folder with --images DIR")
    return photos + wallpapers


def folder_files(folder) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise InputError("images", f"'{path}' is not a folder", "a folder of PNG/JPEG/WebP images")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_uint8(path: Path, max_side: int = MAX_SIDE) -> torch.Tensor:
    """`[3, H, W]` uint8, shrunk (area filter) so the longer side is at most `max_side`."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise InputError(f"image '{path}'", f"it is {im.width}x{im.height} pixels",
                             f"a training image of at most {MAX_PIXELS:,} pixels")
        im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size directly
        im = im.convert("RGB")
        if max(im.size) > max_side:
            s = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BOX)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


@dataclass
class ImageSet:
    """Images split into training and held-out ones, by name."""
    train: list[torch.Tensor]
    train_names: list[str]
    held: list[torch.Tensor]
    held_names: list[str]
    sources: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"train": self.train_names, "held_out": self.held_names, **self.sources}


def load_images(files=None, held_out=HELD_OUT, min_side: int = 128) -> ImageSet:
    """Read every file (default: scikit-image's colour photos and the Debian wallpapers); names in
    `held_out` go to evaluation. Images under `min_side` px are skipped (too small to crop)."""
    files = default_files() if files is None else [Path(f) for f in files]
    train, train_names, held, held_names = [], [], [], []
    for f in files:
        img = read_uint8(f)
        if min(img.shape[1:]) < min_side:
            continue
        name = image_name(f)
        (held if name in held_out else train).append(img)
        (held_names if name in held_out else train_names).append(name)
    if not train:
        raise InputError("images", f"no training image of at least {min_side} px among {len(files)} files "
                         f"(held out: {', '.join(held_names) or 'none'})",
                         f"PNG/JPEG/WebP images of at least {min_side} px a side, not all held out")
    return ImageSet(train, train_names, held, held_names,
                    {"skimage": str(skimage_files()[0].parent) if skimage_files() else None,
                     "wallpapers": str(WALLPAPERS) if WALLPAPERS.is_dir() else None})


def random_crops(images: list[torch.Tensor], n: int, size: int, gen: torch.Generator,
                 scales=(0.25, 1.0)) -> torch.Tensor:
    """`[n, 3, size, size]` in -1..1: for each, a random image, a random scale (the crop covers
    size/scale stored pixels), a random position and a random horizontal flip. Only `gen` draws."""
    out = torch.empty(n, 3, size, size)
    r = torch.rand(n, 5, generator=gen)
    for i in range(n):
        img = images[int(r[i, 0] * len(images)) % len(images)]
        h, w = img.shape[1:]
        scale = scales[0] + (scales[1] - scales[0]) * float(r[i, 1])
        side = min(h, w, max(size, round(size / scale)))
        y, x = int(r[i, 2] * (h - side + 1)), int(r[i, 3] * (w - side + 1))
        crop = img[:, y:y + side, x:x + side].float().div(127.5).sub(1)[None]
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).clamp(-1, 1)  # antialiasing overshoots a little
        out[i] = crop[0].flip(-1) if r[i, 4] < 0.5 else crop[0]
    return out


def centre_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """`[3, H, W]` uint8 → `[1, 3, size, size]` in 0..1: the centred square, area-resized."""
    h, w = img.shape[1:]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    sq = img[:, y:y + s, x:x + s].float().div(255)[None]
    return sq if s == size else F.interpolate(sq, size=(size, size), mode="area")
