"""The raw posterior of a KL VAE: mean, unclamped log-variance, and the statistics built on them.

`read_posterior(codec, images)` runs the encoder once and keeps everything the reference
`DiagonalGaussianDistribution` hides: the raw log-variance before its clamp to [-30, 20] (the SD
"black hole" sits *below* that floor, so a clamped map shows it as "-30 on the dot").

Layouts: images `[B, 3, H, W]` 0..1; moments `[B, 2C, h, w]` (mean, then raw log-variance);
`mean`, `logvar_raw`, `logvar`, `std` `[B, C, h, w]`; `kl` `[B, h, w]`; `kl_total` `[B]`.
Statistics are float32 whatever dtype the model runs in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .codec import Codec, MomentsFn, redo_note
from .errors import InputError
from .memory import available_memory, gib, is_out_of_memory
from .progress import ProgressFn, Steps

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the clamp of the reference DiagonalGaussianDistribution
SIZE_POLICIES = ("crop", "pad")
RANGE_TOLERANCE = 0.01  # resamplers overshoot 0..1 a little; beyond this the image is not 0..1
DEFAULT_TILE_OVERLAP = 64  # pixels of context on each side of a tile's kept core (8 latent cells)
OUT_OF_MEMORY = "out of memory"
MIN_AUTO_TILE_CELLS = 4  # the out-of-memory fallback halves tiles down to 4x4 latent cells


@dataclass(frozen=True)
class SizeHandling:
    """How an image size that is not a multiple of the downscale was made one (never silent).

    crop: the window `processed` starting at `offset` (top, left) of the original was kept
    (centred). pad: `padding` (bottom, right) pixels were added by repeating the edge, so latent
    cell (y, x) still covers original pixels from (y*downscale, x*downscale).
    """
    policy: str
    downscale: int
    original: tuple[int, int]
    processed: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    padding: tuple[int, int] = (0, 0)

    @property
    def changed(self) -> bool:
        return self.original != self.processed

    def describe(self) -> str:
        (h0, w0), (h1, w1) = self.original, self.processed
        if not self.changed:
            return f"{w0}x{h0} used as is (a multiple of {self.downscale})"
        if self.policy == "crop":
            return (f"{w0}x{h0} is not a multiple of {self.downscale}: centre-cropped to {w1}x{h1} "
                    f"(top {self.offset[0]}, left {self.offset[1]} px dropped)")
        return (f"{w0}x{h0} is not a multiple of {self.downscale}: padded to {w1}x{h1} "
                f"(edge repeated, {self.padding[0]} px bottom, {self.padding[1]} px right)")

    def to_dict(self) -> dict:
        return {"policy": self.policy, "downscale": self.downscale, "original": list(self.original),
                "processed": list(self.processed), "offset": list(self.offset),
                "padding": list(self.padding), "changed": self.changed, "note": self.describe()}


@dataclass(frozen=True)
class Tiling:
    """Moments computed tile by tile: each tile runs with `overlap` px of context per side and
    only its core is kept (crop-in-the-middle), so no values are blended."""
    tile: int
    overlap: int
    tiles_per_image: int
    reason: str  # "requested" or "out of memory"

    def describe(self) -> str:
        return (f"tiled ({self.reason}): {self.tiles_per_image} tiles of {self.tile} px with "
                f"{self.overlap} px context; values near tile seams are approximate")

    def to_dict(self) -> dict:
        return {"tile": self.tile, "overlap": self.overlap, "tiles_per_image": self.tiles_per_image,
                "reason": self.reason, "note": self.describe()}


@dataclass
class Posterior:
    """Everything one encoder pass tells about a batch, float32.

    kl: per latent cell, 0.5 * sum_c (mu^2 + sigma^2 - 1 - logvar) in nats, with the *clamped*
    logvar as the reference implementation computes it (so a black-hole cell counts ~14.5 nats per
    channel plus mu^2/2, not its unbounded raw value).
    """
    mean: torch.Tensor        # [B, C, h, w]
    logvar_raw: torch.Tensor  # [B, C, h, w] unclamped, as the encoder produced it
    logvar: torch.Tensor      # [B, C, h, w] clamped to [LOGVAR_MIN, LOGVAR_MAX]
    std: torch.Tensor         # [B, C, h, w] exp(0.5 * logvar)
    kl: torch.Tensor          # [B, h, w] nats per latent cell, summed over channels
    kl_total: torch.Tensor    # [B] nats per image
    size: SizeHandling
    tiling: Optional[Tiling] = None
    notes: list[str] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_channels(self) -> int:
        return self.mean.shape[1]

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.mean.shape[2:])

    def logvar_raw_min(self) -> torch.Tensor:
        """`[B, h, w]`: the lowest raw log-variance over channels at each cell."""
        return self.logvar_raw.amin(dim=1)


def posterior_from_moments(moments: torch.Tensor, size: SizeHandling, tiling: Optional[Tiling] = None,
                           notes=()) -> Posterior:
    """Split `[B, 2C, h, w]` moments and compute the statistics in float32."""
    m = moments.float()
    c = m.shape[1] // 2
    mean, logvar_raw = m[:, :c].contiguous(), m[:, c:].contiguous()
    logvar = logvar_raw.clamp(LOGVAR_MIN, LOGVAR_MAX)
    var = torch.exp(logvar)
    kl = 0.5 * (mean.square() + var - 1.0 - logvar).sum(dim=1)
    notes = list(notes)
    bad = int((~torch.isfinite(m)).sum())
    if bad:
        notes.append(f"{bad} moment values are not finite (NaN/inf): the model overflowed; try float32")
    return Posterior(mean=mean, logvar_raw=logvar_raw, logvar=logvar, std=torch.sqrt(var), kl=kl,
                     kl_total=kl.sum(dim=(1, 2)), size=size, tiling=tiling, notes=notes)


# ---------------------------------------------------------------- input checks and size handling

def check_images(images, name: str = "images") -> tuple[float, float]:
    """Raise InputError unless `images` is a finite float `[B, 3, H, W]` tensor in 0..1; returns (min, max)."""
    expected = "a float tensor [B, 3, H, W] with values in 0..1"
    if not isinstance(images, torch.Tensor):
        raise InputError(name, f"got {type(images).__name__}", expected)
    if images.dim() != 4:
        hint = " (add the batch dimension: images[None])" if images.dim() == 3 else ""
        raise InputError(name, f"has {images.dim()} dimensions, shape {tuple(images.shape)}{hint}", expected)
    if images.shape[1] != 3:
        hint = " (drop alpha: images[:, :3])" if images.shape[1] == 4 else ""
        raise InputError(name, f"has {images.shape[1]} channels{hint}", expected)
    if images.numel() == 0:
        raise InputError(name, f"is empty, shape {tuple(images.shape)}", expected)
    if not images.is_floating_point():
        raise InputError(name, f"has dtype {images.dtype} (for 8-bit data divide by 255)", expected)
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))  # one pass; NaN and inf propagate
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(name, "contains NaN or infinite values", expected)
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = " (for -1..1 data use (x + 1) / 2)" if lo < 0 else ""
        raise InputError(name, f"values span {lo:.3g}..{hi:.3g}{hint}", expected)
    return lo, hi


def prepare_images(images: torch.Tensor, downscale: int = 8, size_policy: str = "crop"):
    """Validate, copy to float32 0..1 and crop or pad to multiples of `downscale`.

    Returns `(x [B, 3, H', W'], SizeHandling)`; `images` itself is never modified.
    """
    check_images(images)
    if size_policy not in SIZE_POLICIES:
        raise InputError("size_policy", f"{size_policy!r}", f"one of {', '.join(SIZE_POLICIES)}")
    if not isinstance(downscale, int) or downscale < 1:
        raise InputError("downscale", f"{downscale!r}", "a positive integer (8 for KL-F8 VAEs)")
    x = images.float().clamp(0.0, 1.0)  # a new tensor: the caller's stays as it was
    h0, w0 = x.shape[2:]
    if size_policy == "crop":
        h1, w1 = h0 // downscale * downscale, w0 // downscale * downscale
        if h1 == 0 or w1 == 0:
            raise InputError("images", f"{w0}x{h0} is smaller than one latent cell ({downscale} px) "
                             "so cropping leaves nothing", "size_policy='pad' or a larger image")
        top, left = (h0 - h1) // 2, (w0 - w1) // 2
        x = x[:, :, top:top + h1, left:left + w1]
        return x, SizeHandling("crop", downscale, (h0, w0), (h1, w1), offset=(top, left))
    pad_b, pad_r = -h0 % downscale, -w0 % downscale
    if pad_b or pad_r:
        x = F.pad(x, (0, pad_r, 0, pad_b), mode="replicate")
    return x, SizeHandling("pad", downscale, (h0, w0), (h0 + pad_b, w0 + pad_r), padding=(pad_b, pad_r))


# ---------------------------------------------------------------- running the encoder

def _check_moments(m, x, downscale: int) -> None:
    b, _, hh, ww = x.shape
    want = (hh // downscale, ww // downscale)
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != b or m.shape[1] % 2:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise InputError("moments_fn output", f"got {got} for input {tuple(x.shape)}",
                         f"[{b}, 2C, {want[0]}, {want[1]}] (mean then log-variance)")
    if tuple(m.shape[2:]) != want:
        raise InputError("downscale", f"{downscale} does not match the model: input {hh}x{ww} gave "
                         f"latents {m.shape[2]}x{m.shape[3]}", "the model's own downscale factor")


def tiled_moments(moments_fn: MomentsFn, x: torch.Tensor, downscale: int, tile: int,
                  overlap: int = DEFAULT_TILE_OVERLAP) -> torch.Tensor:
    """Moments of `x [B, 3, H, W]` (-1..1) tile by tile: each tile of `tile` px is encoded with
    `overlap` px of context around it and only its core is kept. Returns `[B, 2C, h, w]` float32."""
    h, w = x.shape[2] // downscale, x.shape[3] // downscale
    t, o = max(1, tile // downscale), overlap // downscale
    out = None
    for y0 in range(0, h, t):
        for x0 in range(0, w, t):
            y1, x1 = min(y0 + t, h), min(x0 + t, w)
            ya, xa, yb, xb = max(0, y0 - o), max(0, x0 - o), min(h, y1 + o), min(w, x1 + o)
            part = x[:, :, ya * downscale:yb * downscale, xa * downscale:xb * downscale]
            m = moments_fn(part)
            _check_moments(m, part, downscale)
            if out is None:
                out = torch.empty(x.shape[0], m.shape[1], h, w, dtype=torch.float32, device=m.device)
            out[:, :, y0:y1, x0:x1] = m[:, :, y0 - ya:y1 - ya, x0 - xa:x1 - xa].float()
    return out


def _count_tiles(shape, downscale: int, tile: int) -> int:
    t = max(1, tile // downscale)
    return -(-(shape[2] // downscale) // t) * -(-(shape[3] // downscale) // t)


def _first_auto_tile(shape, downscale: int) -> int:
    """512 px, halved while it still spans the whole image (that size just ran out of memory)."""
    longest, tile = max(shape[2], shape[3]), 512
    while tile >= longest and tile // 2 >= downscale * MIN_AUTO_TILE_CELLS:
        tile //= 2
    return max(downscale, tile // downscale * downscale)


def _check_tile(tile, downscale: int) -> None:
    if tile is None:
        return
    if not isinstance(tile, int) or tile < downscale or tile % downscale:
        raise InputError("tile", f"{tile!r}", f"a positive multiple of the downscale ({downscale}) in pixels, or None")


def read_posterior(codec: Codec, images: torch.Tensor, *, size_policy: str = "crop",
                   batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None,
                   tile: Optional[int] = None, tile_overlap: int = DEFAULT_TILE_OVERLAP) -> Posterior:
    """Run the codec's encoder on `images [B, 3, H, W]` (0..1) and return its full raw posterior.

    The codec says where the model runs (inputs go to its `device` in its `dtype`) and its
    `downscale`; nothing is guessed. `size_policy` decides what happens to sizes that are not
    multiples of the downscale (reported in `Posterior.size`). `tile` (px) encodes tile by tile;
    without it an out-of-memory error switches to tiles automatically (reported in `Posterior.tiling`).
    """
    moments_fn, downscale = codec.need_moments(), codec.downscale
    x, size = prepare_images(images, downscale, size_policy)
    _check_tile(tile, downscale)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError("batch_size", f"{batch_size!r}", "a positive integer or None (whole batch)")
    total, step = x.shape[0], batch_size or x.shape[0]
    tiling, chunks, notes = None, [], []
    if tile is not None:
        tiling = Tiling(tile, tile_overlap, _count_tiles(x.shape, downscale, tile), "requested")
    steps, redone = Steps(progress, total), len(codec.retries)
    with torch.no_grad():
        for start in range(0, total, step):
            if tiling is None:  # estimated before the model allocates anything
                tiling = plan_tiling(codec, (min(step, total - start), 3, *x.shape[2:]), tile_overlap)
            part = (x[start:start + step] * 2.0 - 1.0).to(device=codec.device, dtype=codec.dtype)
            m, tiling = _moments_with_fallback(moments_fn, part, downscale, tiling, tile_overlap)
            chunks.append(m.float().to(images.device))
            steps.step(part.shape[0])
    if tiling is not None and tiling.reason != "requested":
        notes.append(f"the whole image did not fit: {tiling.describe()}")
    notes.extend(redo_note(r) for r in codec.retries[redone:])
    moments = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return posterior_from_moments(moments, size, tiling, notes)


def _moments_with_fallback(moments_fn, part, downscale, tiling, overlap):
    if tiling is None:
        try:
            m = moments_fn(part)
            _check_moments(m, part, downscale)
            return m, None
        except Exception as err:  # only out-of-memory is handled; everything else propagates
            if not is_out_of_memory(err):
                raise
            _free_cached_memory()
        tiling = _auto_tiling(_first_auto_tile(part.shape, downscale), overlap, downscale)
    while True:
        try:
            m = tiled_moments(moments_fn, part, downscale, tiling.tile, tiling.overlap)
            count = _count_tiles(part.shape, downscale, tiling.tile)
            return m, Tiling(tiling.tile, tiling.overlap, count, tiling.reason)
        except Exception as err:
            smaller = tiling.tile // 2
            if not is_out_of_memory(err) or tiling.reason == "requested" or smaller < downscale * MIN_AUTO_TILE_CELLS:
                raise
            _free_cached_memory()
            tiling = _auto_tiling(smaller, overlap, downscale)


def plan_tiling(codec: Codec, shape: tuple, overlap: int) -> Optional[Tiling]:
    """None when the codec's estimate for `shape` [B, 3, H, W] fits the memory available (or either
    is unknown); else the largest auto tile whose estimate fits. InputError naming the size when
    not even the smallest tile would fit."""
    need, free = (codec.encode_bytes(shape) if codec.encode_bytes else None), available_memory(codec.device)
    if need is None or free is None or need <= free:
        return None
    tile, smallest = _first_auto_tile((1, 3, *shape[2:]), codec.downscale), codec.downscale * MIN_AUTO_TILE_CELLS
    while tile >= smallest:
        context = _auto_tiling(tile, overlap, codec.downscale).overlap
        if codec.encode_bytes((shape[0], 3, tile + 2 * context, tile + 2 * context)) <= free:
            return Tiling(tile, context, 0, f"memory estimate: {gib(need)} needed, {gib(free)} available")
        tile //= 2
    raise InputError("images", f"{shape[0]} x {shape[2]}x{shape[3]} px need about {gib(need)} to encode and even "
                     f"{smallest} px tiles do not fit the {gib(free)} available",
                     "a smaller image, fewer images at once, or more memory (VAEFIX_MEMORY_LIMIT caps the plan)")


def _auto_tiling(tile: int, overlap: int, downscale: int) -> Tiling:
    # context shrinks with the tile (at most a quarter of it) so small tiles stay small
    context = min(overlap, tile // 4 // downscale * downscale)
    return Tiling(tile, context, 0, OUT_OF_MEMORY)


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
