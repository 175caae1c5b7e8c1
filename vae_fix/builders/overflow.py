"""A KL VAE that really overflows half precision, for tests of the fp16 fix: a seeded random VAE whose
residual streams are multiplied by exact, function-preserving factors (`fp16_scales.apply_scales`),
so fp32 gives the same outputs and fp16 gives inf."""
from __future__ import annotations

from ..fp16_scales import apply_scales, compvis_plan
from ..model import AutoencoderKL, preset_config, random_vae


def overflowing_vae(family: str = "sd", seed: int = 0, factor: float = 3e4) -> AutoencoderKL:
    """Small `family` layout; segment k of each stream multiplied by `factor` x (1 + k)."""
    model = random_vae(preset_config(family, small=True), seed).eval()
    plan = compvis_plan(model)
    apply_scales(plan, {key: factor * (1 + key[1]) for key in plan.stream_keys})
    return model


def norm_overflow_vae(seed: int = 0, factor: float = 2e4) -> AutoencoderKL:
    """Small SD layout whose decoder mid-block `norm1` has weight and bias times `factor`: that norm's
    own output passes fp16's range (1e5 at 2e4), which no exact rescaling reaches (its reader is a
    SiLU). Not the random VAE's function: a VAE for `fp16-fix --finetune`."""
    model = random_vae(preset_config("sd", small=True), seed).eval()
    norm = model.decoder.mid.block_1.norm1
    norm.weight.data.mul_(factor)
    norm.bias.data.mul_(factor)
    return model
