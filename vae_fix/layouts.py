"""Key layouts of KL VAE state dicts: detection, prefix stripping, diffusers ↔ CompVis.

CompVis (a.k.a. ldm / sgm) names are what `vae_fix.model.AutoencoderKL` and ComfyUI's
`comfy.sd.VAE` use: `encoder.down.0.block.0.conv1.weight`, `decoder.up.3.upsample.conv.weight`,
`encoder.mid.attn_1.q.weight` (attention weights as 1×1 convs `[C, C, 1, 1]`).
diffusers names: `encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.up_blocks.0...` (up blocks
numbered deepest first), `encoder.mid_block.attentions.0.to_q.weight` (Linear `[C, C]`; older files
use `query/key/value/proj_attn`, some store 1×1 convs). SVD's temporal decoder maps to the sgm
`VideoDecoder` names (`time_stack`, `mix_factor`, `conv_out.time_mix_conv`).

Every function returns new dicts holding the same tensors (reshaped views for attention weights):
the input is never modified.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .errors import InputError, VAELoadError, short
from .model import VAEConfig, is_foreign_decoder

PREFIXES = ("first_stage_model.", "vae.", "")  # whole SD checkpoints, bundles, bare VAE files
TRAINING_LEFTOVERS = ("loss.", "model_ema.")   # CompVis training checkpoints keep these beside the VAE
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

_DIFFUSERS_MARK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_COMPVIS_MARK = re.compile(r"^(encoder|decoder)\.(down\.\d+|up\.\d+|mid|norm_out)\.")
_ATTN_WEIGHT = re.compile(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$")

# Every mapping is written once, diffusers → CompVis, and read backwards for CompVis → diffusers.
# Names inside one block; where several diffusers spellings map to one CompVis name, the first is written.
_RESNET_PARTS = [("conv_shortcut.", "nin_shortcut.")]
_TEMPORAL_PARTS = [  # SVD's video decoder: the temporal half of each resnet
    ("temporal_res_block.norm1.", "time_stack.in_layers.0."),
    ("temporal_res_block.conv1.", "time_stack.in_layers.2."),
    ("temporal_res_block.norm2.", "time_stack.out_layers.0."),
    ("temporal_res_block.conv2.", "time_stack.out_layers.3."),
    ("time_mixer.mix_factor", "mix_factor"),
]
_SPATIAL = "spatial_res_block."  # ... and diffusers' name for its 2-D half (no CompVis counterpart)
_ATTN_PARTS = [
    ("group_norm.", "norm."),
    ("to_q.", "q."), ("query.", "q."),
    ("to_k.", "k."), ("key.", "k."),
    ("to_v.", "v."), ("value.", "v."),
    ("to_out.0.", "proj_out."), ("proj_attn.", "proj_out."),
]
# Blocks below `encoder.`/`decoder.`: {i} level, {j} block. diffusers numbers up blocks deepest first.
_BLOCKS = [
    ("down_blocks.{i}.resnets.{j}.", "down.{i}.block.{j}.", _RESNET_PARTS),
    ("down_blocks.{i}.attentions.{j}.", "down.{i}.attn.{j}.", _ATTN_PARTS),
    ("down_blocks.{i}.downsamplers.0.", "down.{i}.downsample.", ()),
    ("up_blocks.{i}.resnets.{j}.", "up.{i}.block.{j}.", _RESNET_PARTS),
    ("up_blocks.{i}.attentions.{j}.", "up.{i}.attn.{j}.", _ATTN_PARTS),
    ("up_blocks.{i}.upsamplers.0.", "up.{i}.upsample.", ()),
    ("mid_block.resnets.0.", "mid.block_1.", _RESNET_PARTS),
    ("mid_block.resnets.1.", "mid.block_2.", _RESNET_PARTS),
    ("mid_block.attentions.0.", "mid.attn_1.", _ATTN_PARTS),
    ("conv_norm_out.", "norm_out.", ()),
    ("time_conv_out.", "conv_out.time_mix_conv.", ()),
]


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)"))


_BLOCK_REGEX = {t: _template_regex(t) for rule in _BLOCKS for t in rule[:2]}


# ---------------------------------------------------------------- detection and prefixes

def detect_layout(keys) -> str:
    """'compvis', 'diffusers', 'mixed' (both kinds of names) or 'unknown', for keys without prefix."""
    keys = list(keys)
    diffusers = any(_DIFFUSERS_MARK.match(k) for k in keys)
    compvis = any(_COMPVIS_MARK.match(k) for k in keys)
    if diffusers and compvis:
        return "mixed"
    return "diffusers" if diffusers else "compvis" if compvis else "unknown"


def vae_prefixes(keys) -> list[str]:
    """Every prefix under which encoder or decoder weights appear (normally exactly one)."""
    keys = list(keys)
    return [p for p in PREFIXES if any(k.startswith((p + "encoder.", p + "decoder.")) for k in keys)]


def split_vae_keys(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict, list[str]]:
    """(VAE tensors with the prefix removed, names of every other key)."""
    vae, ignored = {}, []
    for key, value in sd.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None or name.startswith(TRAINING_LEFTOVERS) or (prefix and not name.startswith(VAE_ROOTS)):
            ignored.append(key)
        else:
            vae[name] = value
    return vae, ignored


def to_compvis(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[dict, str, str, list[str]]:
    """Any supported layout → (CompVis state dict without prefix, source layout, prefix, ignored keys).

    Ignored keys are the non-VAE keys of a whole checkpoint and training leftovers (`loss.*`,
    `model_ema.*`). Names that match no rule pass through unchanged so a strict check reports them.
    Raises VAELoadError (naming `source`) when there is no VAE or the names mix both layouts.
    """
    keys = list(sd)
    prefixes = vae_prefixes(keys)
    if len(prefixes) > 1:
        shown = " and ".join(f"'{p}'" if p else "no prefix" for p in prefixes)
        raise VAELoadError(source, f"it holds VAE weights under more than one prefix ({shown})",
                           "one VAE per file", [next(k for k in keys if k.startswith(p + "encoder.")) for p in prefixes
                                                if any(k.startswith(p + "encoder.") for k in keys)])
    prefix = prefixes[0] if prefixes else None
    if prefix is None:
        raise VAELoadError(
            source, f"not a VAE: none of its {len(keys)} keys is an encoder or decoder weight",
            "keys such as 'encoder.conv_in.weight' (CompVis) or 'encoder.down_blocks.0...' (diffusers), "
            "bare or under 'first_stage_model.' or 'vae.'", keys)
    vae, ignored = split_vae_keys(sd, prefix)
    layout = detect_layout(vae)
    if layout == "mixed":
        diffusers_keys = [k for k in vae if _DIFFUSERS_MARK.match(k)]
        raise VAELoadError(source, "its key names mix the CompVis and diffusers layouts",
                           "one layout throughout", diffusers_keys)
    if layout == "diffusers":
        vae = diffusers_to_compvis(vae)
    return vae, ("compvis" if layout == "unknown" else layout), prefix, ignored


# ---------------------------------------------------------------- renaming, both ways from one table

def _n_up_levels(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _swap(tail: str, parts, to_compvis: bool) -> str:
    """Rename the start of `tail` by the first matching (diffusers, CompVis) pair, read either way."""
    for diffusers, compvis in parts:
        src, dst = (diffusers, compvis) if to_compvis else (compvis, diffusers)
        if tail.startswith(src):
            return dst + tail[len(src):]
    return tail


def _resnet_tail(tail: str, to_compvis: bool, temporal: bool) -> str:
    """The part after a resnet's head. SVD's video decoder wraps each 2-D resnet as
    `spatial_res_block.` beside its temporal parts; CompVis keeps both halves in one block."""
    temporal_tail = _swap(tail, _TEMPORAL_PARTS, to_compvis)
    if temporal_tail != tail:
        return temporal_tail
    if to_compvis:
        return _swap(tail.removeprefix(_SPATIAL), _RESNET_PARTS, True)
    return (_SPATIAL if temporal else "") + _swap(tail, _RESNET_PARTS, False)


def _rename_block(rest: str, to_compvis: bool, n_up: int, temporal: bool) -> str:
    """One key below `encoder.`/`decoder.` renamed to the other layout (unchanged when no rule matches)."""
    for diffusers, compvis, parts in _BLOCKS:
        src, dst = (diffusers, compvis) if to_compvis else (compvis, diffusers)
        if m := _BLOCK_REGEX[src].match(rest):
            index = {k: int(v) for k, v in m.groupdict().items()}
            if diffusers.startswith("up_blocks."):  # deepest first ↔ by level: the same flip both ways
                index["i"] = n_up - 1 - index["i"]
            tail = rest[m.end():]
            tail = _resnet_tail(tail, to_compvis, temporal) if parts is _RESNET_PARTS else _swap(tail, parts, to_compvis)
            return dst.format(**index) + tail
    return rest


def _rename(sd: Mapping[str, torch.Tensor], to_compvis: bool, n_up: int, temporal: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in sd.items():
        root, dot, rest = name.partition(".")
        key = f"{root}.{_rename_block(rest, to_compvis, n_up, temporal and root == 'decoder')}" \
            if root in ("encoder", "decoder") and dot else name
        if _ATTN_WEIGHT.search(key if to_compvis else name):  # Linear [C, C] in diffusers, 1×1 conv [C, C, 1, 1] in CompVis
            if to_compvis and value.dim() == 2:
                value = value.reshape(*value.shape, 1, 1)
            elif not to_compvis and value.dim() == 4:
                value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value
    return out


def diffusers_to_compvis(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names (no prefix) → CompVis names; Linear attention weights `[C, C]` → `[C, C, 1, 1]`."""
    return _rename(sd, True, _n_up_levels(sd, r"decoder\.up_blocks\.(\d+)\."), temporal=False)


def compvis_to_diffusers(sd: Mapping[str, torch.Tensor], config: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """CompVis names (no prefix) → diffusers names (`to_q`… with Linear `[C, C]` attention weights).

    The up-level count comes from `config` when it has a KL decoder, else from the keys.
    """
    n_up = len(config.channel_mult) if config is not None and config.decoder_kind == "kl" else \
        _n_up_levels(sd, r"decoder\.up\.(\d+)\.")
    return _rename(sd, False, n_up, temporal=is_foreign_decoder(sd))


# ---------------------------------------------------------------- diffusers config.json

DIFFUSERS_EXTRA_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size")


def diffusers_config(config: VAEConfig, extra: Mapping | None = None) -> dict:
    """The `config.json` diffusers' `AutoencoderKL` needs for `config`.

    `extra` supplies what the weights cannot tell (scaling_factor, shift_factor, latents_mean/std,
    force_upcast, sample_size), e.g. from the config.json the VAE was read with; diffusers' defaults
    apply to whatever is left out.
    """
    if config.decoder_kind != "kl":
        raise InputError("VAE config", "it has no KL decoder, and diffusers' AutoencoderKL needs one",
                         "a VAE whose encoder and decoder were both loaded")
    if config.z_channels != config.latent_channels or not config.double_z:
        raise InputError("VAE config", f"z_channels={config.z_channels} differs from latent_channels="
                         f"{config.latent_channels} (or the encoder is not double_z), which diffusers cannot express",
                         "the CompVis layout for this VAE")
    out = {"_class_name": "AutoencoderKL", **_described_by_weights(config)}
    for name in DIFFUSERS_EXTRA_FIELDS:
        if extra and name in extra:
            out[name] = extra[name]
    return out


def _described_by_weights(config: VAEConfig) -> dict:
    """The diffusers `AutoencoderKL` arguments these weights imply (the groups as inferred)."""
    levels = range(len(config.channel_mult))
    return {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in config.attn_levels else "DownEncoderBlock2D" for i in levels],
        "up_block_types": ["AttnUpDecoderBlock2D" if i in config.attn_levels else "UpDecoderBlock2D" for i in reversed(levels)],
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks, "act_fn": "silu", "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups, "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv, "mid_block_add_attention": config.mid_attention,
    }


_DECODER_FIELDS = ("out_channels", "up_block_types", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
KL_DEFAULTS = {  # diffusers.AutoencoderKL.__init__ defaults, used when config.json leaves a field out
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64],
    "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
KL_CLASSES = {"AutoencoderKL": "kl", "AutoencoderKLTemporalDecoder": "temporal"}


def check_diffusers_config(cj: dict, config: VAEConfig, foreign: bool, where) -> None:
    """Raise VAELoadError (naming `where`) when a diffusers config.json disagrees with the weights' config."""
    cls = cj.get("_class_name", "AutoencoderKL")
    if not isinstance(cls, str) or cls not in KL_CLASSES:
        raise VAELoadError(where, f"config.json describes a {str(cls)[:80]}, not a KL autoencoder",
                           "_class_name AutoencoderKL (or AutoencoderKLTemporalDecoder)", ["_class_name"])
    if (KL_CLASSES[cls] == "temporal") != foreign:
        kind = "a temporal video decoder" if foreign else "a KL image decoder"
        raise VAELoadError(where, f"config.json says {cls} but the weights have {kind}", "a config.json written for these weights", ["_class_name"])
    actual = _described_by_weights(config)
    if foreign:  # an encoder-only read: the temporal decoder's settings are not checked
        actual = {k: v for k, v in actual.items() if k not in _DECODER_FIELDS}
    said = {k: cj.get(k, KL_DEFAULTS[k]) for k in actual}
    said = {k: list(v) if isinstance(v, tuple) else v for k, v in said.items()}
    wrong = [k for k in actual if said[k] != actual[k]]
    if wrong:
        diffs = "; ".join(f"{k} is {short(repr(said[k]))} in config.json but {actual[k]!r} in the weights" for k in wrong)
        raise VAELoadError(where, f"config.json disagrees with the weights: {diffs}",
                           f"a config.json that matches the weights file next to it (GroupNorm({config.norm_groups}) and SiLU, as read)", wrong)
