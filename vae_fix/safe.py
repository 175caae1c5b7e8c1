"""Half precision without black images: encode or decode in the VAE's own dtype and redo in float32
whatever comes out non-finite (an fp16 overflow inside the VAE shows as NaN, then a black image).

`safe_decode` / `safe_encode` run an engine `Codec` (the CLI's `decode` and `encode`);
`first_finite` runs any list of attempts (the Safe VAE Decode/Encode nodes: core's own decode,
then a float32 twin of the host VAE). Both return a `SafeRun` that says which dtype gave the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .codec import Codec, dtype_name, non_finite
from .errors import InputError
from .posterior import check_images, prepare_images
from .repair import to_unit
from .result import Picture, Result

Attempt = tuple[str, Callable[[], torch.Tensor]]  # (dtype name, run) tried in order


@dataclass
class SafeRun(Result):
    kind: str                      # "decode" or "encode"
    output: torch.Tensor           # decode: images [B, 3, H, W] in 0..1; encode: latent means [B, C, h, w]
    attempts: list[dict] = field(default_factory=list)  # {"dtype", "non_finite", "of", "seconds"} in order
    json_name = "safe_run"

    @property
    def dtype_used(self) -> str:
        return self.attempts[-1]["dtype"]

    @property
    def redone(self) -> bool:
        return len(self.attempts) > 1

    def to_json(self) -> dict:
        return {"kind": self.kind, "dtype_used": self.dtype_used, "redone_in_float32": self.redone,
                "shape": list(self.output.shape), "attempts": self.attempts}

    def summary(self) -> str:
        first = self.attempts[0]
        verb = "decoded" if self.kind == "decode" else "encoded"
        if not self.redone:
            return f"{verb} in {first['dtype']}: every value finite"
        return (f"{first['dtype']} gave {first['non_finite']:,} non-finite values of {first['of']:,} "
                f"(an overflow inside the VAE): {verb} again in {self.dtype_used}, every value finite")

    def pictures(self) -> dict[str, Picture | list[Picture]]:
        return {"decoded": list(self.output)} if self.kind == "decode" else {}


def first_finite(kind: str, attempts: Sequence[Attempt], input_name: str = "vae") -> SafeRun:
    """Run `attempts` in order until one gives only finite values. Output tensors pass unchanged.
    InputError naming the VAE when even the last (float32) attempt is not finite."""
    records = []
    for dtype, run in attempts:
        start = time.perf_counter()
        out = run()
        records.append({"dtype": dtype, "non_finite": non_finite(out), "of": out.numel(),
                        "seconds": round(time.perf_counter() - start, 4)})
        if not records[-1]["non_finite"]:
            break
    return _checked(SafeRun(kind, out, records), input_name)


def _through_codec(kind: str, codec: Codec, call: Callable[[], torch.Tensor]) -> SafeRun:
    """One call through the codec, whose own float32 redo (`with_fp32_retry`) records the failed
    half-precision attempt: the attempts are that record, then the result."""
    before, start = len(codec.retries), time.perf_counter()
    out = call()
    records = [{k: v for k, v in r.items() if k != "call"} for r in codec.retries[before:]]
    spent = round(time.perf_counter() - start - sum(r["seconds"] for r in records), 4)
    records.append({"dtype": "float32" if records else dtype_name(codec.dtype), "non_finite": non_finite(out),
                    "of": out.numel(), "seconds": spent})
    return _checked(SafeRun(kind, out, records), codec.input_name)


def _checked(run: SafeRun, input_name: str) -> SafeRun:
    last = run.attempts[-1]
    if last["non_finite"]:
        raise InputError(input_name, f"its {run.kind} gives {last['non_finite']:,} non-finite values even in {last['dtype']}",
                         "a VAE with finite weights (check it with Load VAE (strict)), or finite inputs")
    return run


def safe_decode(codec: Codec, z: torch.Tensor, input_name: str = "latent") -> SafeRun:
    """`z [B, C, h, w]` → images `[B, 3, H, W]` in 0..1, in the codec's dtype, redone in float32 when
    that is not finite."""
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != codec.latent_channels:
        shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(input_name, f"shape {shape}", f"[B, {codec.latent_channels}, h, w] for this VAE")
    if non_finite(z):
        raise InputError(input_name, f"{non_finite(z):,} non-finite values", "a finite latent")
    decode = codec.need_decoder()
    run = _through_codec("decode", codec, lambda: decode(z.float()))
    run.output = to_unit(run.output)
    return run


def safe_encode(codec: Codec, images: torch.Tensor) -> SafeRun:
    """`images [B, 3, H, W]` in 0..1 → posterior means `[B, C, h, w]` (what core's VAE Encode returns),
    in the codec's dtype, redone in float32 when that is not finite. Sizes are cropped to the
    downscale, as core does."""
    check_images(images)
    moments = codec.need_moments()
    x, _ = prepare_images(images, codec.downscale, "crop")
    with torch.no_grad():
        return _through_codec("encode", codec, lambda: moments(x * 2 - 1)[:, :codec.latent_channels])

