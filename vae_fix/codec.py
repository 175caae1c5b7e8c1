"""What the engine needs of a VAE, wherever it runs: the engine's own model or the host's.

Every feature that needs a VAE takes a `Codec`. The CLI builds one from a file
(`LoadedVAE.codec()`), the ComfyUI layer from a host VAE (`nodes/host.py` `codec`). Nothing in the
engine guesses a device, a dtype or a downscale from a callable: the codec says.

Callables (all float32 results, on the codec's `device`):
- `moments(x [B, 3, H, W] in -1..1) -> [B, 2C, h, w]`: mean then raw (unclamped) log-variance;
- `decode(z [B, C, h, w]) -> [B, 3, H, W]` in -1..1, no gradients;
- `decode_grad(z)`: the same with gradients flowing back to `z` (for the fast reach map);
- `clip_moments(frames [N, 3, H, W]) -> [T, 2C, h, w]`: a video VAE's latent frames of one clip
  (`frame_step` says how many input frames each covers); `moments` is then its one-frame-clip encode.
A VAE without a posterior (TAESD, pixel space) or without an image decoder has `None` there and
says why in `no_moments` / `no_decoder`; `need_moments()` / `need_decoder()` raise that reason.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .errors import InputError

ENCODE_ACTIVATIONS = 6  # measured: 5 (full SD encoder at 1024 px, 2.5 GiB peak); 6 leaves a margin
MomentsFn = Callable[[torch.Tensor], torch.Tensor]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]
KL_EXPECTED = ("a VAE with a Gaussian posterior (SD1.x/2.x, SDXL, SD3, Flux, a retrained KL-F8, Wan, Qwen-Image, "
               "HunyuanVideo, Hunyuan Image, Mochi or LTXV)")


@dataclass(frozen=True)
class Codec:
    name: str
    latent_channels: int
    downscale: int
    device: torch.device
    dtype: torch.dtype                       # the dtype the model computes in (inputs are cast to it)
    moments: Optional[MomentsFn] = None
    decode: Optional[DecodeFn] = None
    decode_grad: Optional[DecodeFn] = None
    info: dict = field(default_factory=dict)  # the report's "vae" entry: file, layout, kind, ...
    no_moments: str = "it has no posterior variance to read"
    no_decoder: str = "it has no image decoder"
    input_name: str = "vae"                  # how errors name this VAE (a node input, a CLI flag)
    fp32: Optional[Callable[[], "Codec"]] = None  # the same VAE computing in float32 (half-precision codecs)
    retries: list = field(default_factory=list)   # one record per call redone in float32, in order
    encode_bytes: Optional[Callable[[tuple], int]] = None  # memory an encode of [B, 3, H, W] needs (estimate)
    clip_moments: Optional[MomentsFn] = None  # a video VAE: frames [N, 3, H, W] of one clip -> [T, 2C, h, w]
    frame_step: Optional[tuple] = None        # (input frames in latent frame 0, in each later one): Wan (1, 4)

    def need_moments(self) -> MomentsFn:
        if self.moments is None:
            raise InputError(self.input_name, self.no_moments, KL_EXPECTED)
        return self.moments

    def need_decoder(self, grad: bool = False) -> DecodeFn:
        fn = self.decode_grad if grad else self.decode
        if fn is None:
            raise InputError(self.input_name, self.no_decoder, f"{KL_EXPECTED}, or TAESD, with a decoder")
        return fn

    def renamed(self, name: str, input_name: Optional[str] = None) -> "Codec":
        return replace(self, name=name, input_name=input_name or self.input_name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def non_finite(t: torch.Tensor) -> int:
    return int(t.numel() - torch.isfinite(t).sum()) if t.is_floating_point() else 0


def redo_note(record: dict) -> str:
    return (f"{record['call']} in {record['dtype']} gave {record['non_finite']:,} non-finite values of "
            f"{record['of']:,}: redone in float32")


def with_fp32_retry(codec: Codec) -> Codec:
    """`codec` whose moments and decodes are redone in float32 when its half precision gives a
    non-finite value (an fp16 overflow: black or NaN images), each redo recorded in `retries`
    ({"call", "dtype", "non_finite", "of", "seconds"}). A float32 codec, or one without `fp32`, is returned as is."""
    if codec.dtype == torch.float32 or codec.fp32 is None:
        return codec
    twin: list[Codec] = []  # the float32 codec, built on first need and kept
    retries: list = []

    def guarded(name: str, fn):
        if fn is None:
            return None

        def run(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = fn(x)
            bad = non_finite(out)
            if not bad:
                return out
            retries.append({"call": name, "dtype": dtype_name(codec.dtype), "non_finite": bad, "of": out.numel(),
                            "seconds": round(time.perf_counter() - start, 4)})
            if not twin:
                twin.append(codec.fp32())
            return getattr(twin[0], name)(x)
        return run

    return replace(codec, moments=guarded("moments", codec.moments), decode=guarded("decode", codec.decode),
                   decode_grad=guarded("decode_grad", codec.decode_grad), retries=retries)


def model_codec(model: torch.nn.Module, name: str = "vae", info: Optional[dict] = None,
                input_name: str = "--vae") -> Codec:
    """A codec running the engine's own `AutoencoderKL`: latents go to its device and dtype and
    come back float32 on that device."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype

    def moments(x):
        return model.moments(x.to(device=device, dtype=dtype)).float()

    def decode(z):
        with torch.no_grad():
            return model.decode(z.to(device=device, dtype=dtype)).float()

    def decode_grad(z):
        return model.decode(z.to(device=device, dtype=dtype)).float()

    has_decoder = bool(getattr(model, "has_decoder", True))

    def fp32() -> Codec:  # a float32 copy of the model, for the redo of a non-finite half-precision result
        import copy
        return model_codec(copy.deepcopy(model).float(), name, info, input_name)

    cfg, dtype_bytes = model.config, torch.finfo(dtype).bits // 8

    def encode_bytes(shape) -> int:  # ~5 live activations of the widest full-resolution level, + margin
        return ENCODE_ACTIVATIONS * cfg.base_channels * cfg.channel_mult[0] * math.prod(shape) // 3 * dtype_bytes

    return with_fp32_retry(Codec(
        name, model.config.latent_channels, model.config.downscale, device, dtype, encode_bytes=encode_bytes,
        moments=moments, decode=decode if has_decoder else None, decode_grad=decode_grad if has_decoder else None,
        info=dict(info or {}), no_decoder="only its encoder was loaded (the file has no KL decoder)",
        input_name=input_name, fp32=fp32))


# The one dtype table of the pack (nodes and CLI). "auto": the host chooses (the CLI: float32).
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
DTYPE_CHOICES = tuple(DTYPES) + tuple(_DTYPE_ALIASES)


def parse_dtype(name: str, input_name: str = "dtype") -> Optional[torch.dtype]:
    """'fp16' (or 'float16') → torch.float16; 'auto' → None; InputError naming the choices otherwise."""
    key = _DTYPE_ALIASES.get(str(name), str(name))
    if key not in DTYPES:
        raise InputError(input_name, f"'{name}' is not a known dtype", f"one of {', '.join(DTYPES)}")
    return DTYPES[key]
