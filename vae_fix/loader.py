"""Strict, safe VAE loading and saving in every layout. Loading never lies: it either returns a
complete, finite, correctly shaped VAE with notes on everything it did, or raises VAELoadError
naming the file, the problem, the first offending keys and what was expected.

Containers (safetensors, diffusers folders, weights-only torch files) are read by `containers`;
key layouts (CompVis, diffusers with old and new attention names, whole checkpoints under
`first_stage_model.`, a `vae.` prefix) are mapped by `layouts`. Here the tensors are checked
against the architecture their shapes describe.

Saving (`save_vae`): `layout="compvis"` writes one `.safetensors` file; `layout="diffusers"` writes
a folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a single diffusers-named
`.safetensors` file when the path ends in `.safetensors`. Tensors are written as they are (same
dtype and values), so conversions round-trip bit-exactly.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__, layouts
from .containers import (
    MAX_CONFIG_DEPTH,
    WEIGHT_NAMES,
    RawWeights,
    json_depth,
    read_container,
    write_safetensors,
)
from .errors import InputError, VAELoadError
from .finite import check_finite
from .model import DECODER_NORMS, AutoencoderKL, VAEConfig, check_padding, infer_config, is_foreign_decoder, set_padding
from .result import Result

CONFIG_META_KEY = "vae_fix.diffusers_config"  # diffusers-only settings kept inside CompVis files
NORM_META_KEY = "vae_fix.decoder_norm"  # "pixel": a decoder the shapes cannot tell apart from GroupNorm's
BOUND_META_KEY = "vae_fix.latent_bound"  # "3": means bounded by 3 tanh(mean / 3), which no weight expresses


@dataclass
class VAEFile(Result):
    """A validated VAE read from disk. `state_dict` is CompVis layout, no prefix (what
    `comfy.sd.VAE(sd=...)` accepts), tensors as stored (dtype unchanged).

    As a result (`python -m vae_fix check`, the `info` of Load VAE (strict)): its JSON is `info()`,
    its summary one line about the file plus the loader's notes."""
    state_dict: dict[str, torch.Tensor]
    config: VAEConfig
    path: str
    layout: str                      # "compvis" | "diffusers" (the layout on disk)
    container: str                   # "safetensors" | "diffusers-folder" | "torch-weights-only"
    prefix: str = ""                 # "", "first_stage_model.", "vae."
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra_config: dict = field(default_factory=dict)   # scaling_factor etc. from a diffusers config.json
    ignored_keys: list[str] = field(default_factory=list)

    json_name = "vae"

    def dtypes(self) -> list[str]:
        return sorted({str(v.dtype).replace("torch.", "") for v in self.state_dict.values()})

    def info(self) -> dict:
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.to_dict().items()}
        return {
            "path": self.path, "layout": self.layout, "container": self.container, "prefix": self.prefix,
            "latent_channels": self.config.latent_channels, "downscale": self.config.downscale,
            "decoder": self.config.decoder_kind, "tensors": len(self.state_dict), "dtypes": self.dtypes(),
            "ignored_keys": len(self.ignored_keys), "config": cfg, "extra_config": dict(self.extra_config),
            "metadata_keys": sorted(self.metadata), "notes": list(self.notes),
        }

    def to_json(self) -> dict:
        return self.info()

    def summary(self) -> str:
        head = (f"{self.path}: {self.layout} layout ({self.container}), {describe(self.config)}, "
                f"{self.config.downscale}x downscale, {len(self.state_dict)} tensors ({', '.join(self.dtypes())})")
        return "\n".join([head] + [f"  note: {note}" for note in self.notes])


@dataclass
class LoadedVAE:
    model: AutoencoderKL
    file: VAEFile
    padding: str = "zeros"  # how its convolutions pad the border (model.PADDING_MODES)

    @property
    def config(self) -> VAEConfig:
        return self.model.config

    def info(self) -> dict:
        p = next(self.model.parameters())
        return {**self.file.info(), "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
                "padding": self.padding, "parameters": sum(t.numel() for t in self.model.parameters())}

    def codec(self, name: str | None = None, input_name: str = "--vae"):
        """This model as the engine's `Codec` (what every feature that needs a VAE takes)."""
        from .codec import model_codec
        return model_codec(self.model, name or Path(self.file.path).name, self.info(), input_name)


# ---------------------------------------------------------------- public API

def read_vae(path) -> VAEFile:
    """Read and validate a VAE in any supported container and layout (tensors stay on CPU)."""
    return validate_weights(read_container(Path(path)), str(path))


def validate_weights(raw: RawWeights, path: str, finite: bool = True) -> VAEFile:
    """The full KL validation of what a container held (`containers.read_container`), as `read_vae`
    does it: layout, prefix, every key and shape of the architecture the shapes describe, finite
    floating-point values (`finite=False`: the caller runs `check_finite` itself, before using the
    weights). VAELoadError naming `path` otherwise."""
    return _validate(raw, path, finite)


def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32, padding: str = "zeros") -> LoadedVAE:
    """Read, validate and build the model: eval mode, requires_grad False, on `device` in `dtype`,
    its convolutions padding with `padding` ('zeros' or 'reflect', for VAEs retrained with reflection).

    Where the file's dtype and `device` match, the parameters share storage with `file.state_dict`.
    """
    check_padding(padding)  # before any reading
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError("dtype", f"{dtype!r} is not a floating point torch dtype", "torch.float32, float16 or bfloat16")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        raise InputError("device", f"{device!r} cannot be used ({e})", "'cpu' or an available accelerator such as 'cuda'") from None
    return build_model(read_vae(path), device, dtype, padding)


def build_model(file: VAEFile, device="cpu", dtype: torch.dtype = torch.float32, padding: str = "zeros") -> LoadedVAE:
    """The engine's model of a validated `VAEFile`: eval mode, requires_grad False."""
    with torch.device("meta"):
        model = AutoencoderKL(file.config)
    # No second copy of the weights: where dtype and device already match, the model's parameters
    # share storage with file.state_dict (treat both as read-only).
    weights = {k: v.to(device=device, dtype=dtype) for k, v in file.state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    set_padding(model, padding)
    return LoadedVAE(model.eval().requires_grad_(False), file, padding)


def vae_from_state_dict(sd: dict, name: str = "<state dict>") -> VAEFile:
    """Validate tensors already in memory (a host model's state dict, say) as if read from a file."""
    return _validate(RawWeights({k: v.detach().cpu() for k, v in sd.items()}, Path(name), "state-dict"), name)


def save_vae(vae, path, layout: str = "compvis", metadata: dict | None = None) -> Path:
    """Write `vae` (LoadedVAE, VAEFile or AutoencoderKL) as safetensors in `layout`; returns what was written.

    compvis: `path` must end in .safetensors. diffusers: a folder with config.json +
    diffusion_pytorch_model.safetensors, or one diffusers-named file if `path` ends in .safetensors
    (its diffusers-only settings then stay in the metadata). The source metadata is kept, `metadata`
    is merged in and a "vae_fix" note says what wrote the file.
    """
    sd, config, meta, extra, source = _save_parts(vae)
    if layout not in ("compvis", "diffusers"):
        raise InputError("layout", f"{layout!r} is not a layout this can write", "'compvis' or 'diffusers'")
    if config.decoder_kind != "kl":
        raise InputError("VAE to save", "its decoder was not loaded (only the encoder of this VAE is supported), "
                         "so the file would not be a complete VAE", "a VAE with a KL decoder")
    meta.update(_string_metadata(metadata))
    meta["vae_fix"] = f"written by vae_fix {__version__} in the {layout} layout from {source}"
    path = Path(path)
    tensors = {k: _plain(v) for k, v in sd.items()}
    single_file = path.suffix == ".safetensors"
    if layout == "compvis" and not single_file:
        raise InputError("output path", f"'{path}' does not end in .safetensors", "a path like vae.safetensors for the CompVis layout")
    if layout == "diffusers":
        config_json = layouts.diffusers_config(config, extra)
        tensors = layouts.compvis_to_diffusers(tensors, config)
    if config.decoder_norm != "group" or config.latent_bound:
        if layout == "diffusers":
            raise InputError("layout", "diffusers' AutoencoderKL has neither a pixel norm in its decoder nor tanh-bounded latents",
                             "'compvis' for this VAE")
        meta.update(_variant_metadata(config))
    if single_file:
        if extra:
            meta[CONFIG_META_KEY] = json.dumps(extra, sort_keys=True)
        return write_safetensors(tensors, path, meta)
    if path.exists() and not path.is_dir():
        raise InputError("output path", f"'{path}' is an existing file", "a folder path for the diffusers layout (or a .safetensors path)")
    meta.pop(CONFIG_META_KEY, None)  # the folder's config.json carries these
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path / WEIGHT_NAMES[0], meta)
    (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- validation

def _validate(raw: RawWeights, path: str, finite: bool = True) -> VAEFile:
    where = str(raw.weights_path)
    sd, layout, prefix, ignored = layouts.to_compvis(raw.tensors, source=where)
    notes = list(raw.notes)
    if prefix or ignored:
        notes.append(_ignored_note(prefix, ignored))
    if layout == "diffusers":
        notes.append("converted diffusers key names to the CompVis layout")
    foreign = is_foreign_decoder(sd)
    if foreign:
        dropped = [k for k in sd if k.startswith(("decoder.", "post_quant_conv."))]
        sd = {k: v for k, v in sd.items() if k not in dropped}
        notes.append(f"decoder not loaded: it is a temporal video decoder (SVD's: time_stack, mix_factor, time_mix_conv), "
                     f"not a KL image decoder; its {len(dropped)} tensors were skipped, only the encoder is available")
    config = _with_study_variant(_infer(sd, where), raw.metadata, where)
    _check_keys(sd, config, foreign, where)
    _check_values(sd, where, finite)
    extra = {}
    if raw.config_json is not None:
        layouts.check_diffusers_config(raw.config_json, config, foreign, raw.weights_path.parent / "config.json")
        extra = {k: raw.config_json[k] for k in layouts.DIFFUSERS_EXTRA_FIELDS if k in raw.config_json}
    elif CONFIG_META_KEY in raw.metadata:
        extra = _config_from_metadata(raw.metadata[CONFIG_META_KEY], notes)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    if set(dtypes) != {"float32"}:
        notes.append("weights stored as " + ", ".join(f"{d} ({n})" for d, n in dtypes.most_common()))
    return VAEFile(sd, config, path, layout, raw.container, prefix, raw.metadata, notes, extra, ignored)


def _ignored_note(prefix: str, ignored: list[str]) -> str:
    groups = sorted({".".join(k.split(".")[:2]) for k in ignored})
    shown = ", ".join(g + ".*" for g in groups[:4]) + (", ..." if len(groups) > 4 else "")
    note = f"stripped the '{prefix}' prefix" if prefix else "no prefix"
    return f"{note}; ignored {len(ignored)} non-VAE tensors ({shown})" if ignored else note


def _infer(sd: dict, where: str) -> VAEConfig:
    try:
        return infer_config(sd)
    except KeyError as e:
        key = e.args[0]
        raise VAELoadError(where, f"the key '{key}', from which the architecture is read, is missing",
                           "a complete KL VAE: encoder.conv_in, encoder.down.*, encoder.conv_out, decoder.* "
                           "(CompVis names) or their diffusers equivalents", [key]) from None
    except ValueError as e:
        raise VAELoadError(where, f"not a KL VAE architecture: {e}", "the keys of a KL VAE (SD1.x/2.x, SDXL, SD3, Flux, "
                           "retrained KL-F8)") from None
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise VAELoadError(where, f"its tensor shapes do not form a KL VAE ({e})", "4-D convolution weights") from None


def describe(config: VAEConfig) -> str:
    widths = "/".join(str(config.base_channels * m) for m in config.channel_mult)
    quant = "with" if config.use_quant_conv else "without"
    return (f"{config.latent_channels}-channel KL VAE (widths {widths}, {config.num_res_blocks} res blocks per level, "
            f"{quant} quant_conv)")


@functools.lru_cache(maxsize=32)  # building even a meta model costs a third of a host load
def _expected_shapes(config: VAEConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(sd: dict, config: VAEConfig, foreign: bool, where: str) -> None:
    full = config
    if not foreign:  # a KL VAE has a decoder and either both 1×1 quant convs or neither
        quant = config.use_quant_conv or config.use_post_quant_conv
        full = replace(config, decoder_kind="kl", use_quant_conv=quant, use_post_quant_conv=quant)
    try:
        expected = _expected_shapes(full)
    except (RuntimeError, ValueError) as e:
        raise VAELoadError(where, f"its tensor shapes do not form a KL VAE ({e})", describe(config)) from None
    what = describe(full) + (" encoder" if foreign else "")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise VAELoadError(where, f"{len(missing)} of the {len(expected)} tensors of a {what} are missing",
                           f"all {len(expected)} tensors (a partial file would load as a broken VAE)", missing)
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise VAELoadError(where, f"{len(unexpected)} tensors that a {what} does not have",
                           f"only the {len(expected)} tensors of that layout", unexpected)
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(expected[k])})" for k in expected if tuple(sd[k].shape) != expected[k]]
    if wrong:
        raise VAELoadError(where, f"{len(wrong)} tensors have the wrong shape for a {what}",
                           "shapes consistent with encoder.conv_in, the level widths and the latent channels", wrong)


def _check_values(sd: dict, where: str, finite: bool = True) -> None:
    not_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise VAELoadError(where, "some weights are not floating point", "float32, float16 or bfloat16 weights", not_float)
    if finite:
        check_finite(sd, where)


def _variant_metadata(config: VAEConfig) -> dict:
    """What a study variant's file must declare: the same weights compute something else."""
    meta = {NORM_META_KEY: config.decoder_norm} if config.decoder_norm != "group" else {}
    return meta | ({BOUND_META_KEY: repr(float(config.latent_bound))} if config.latent_bound else {})


def _with_study_variant(config: VAEConfig, metadata: dict, where: str) -> VAEConfig:
    """The config with the decoder's norm and the latent bound the file declares (same weights, other function)."""
    norm = metadata.get(NORM_META_KEY, "group")
    if norm not in DECODER_NORMS:
        raise VAELoadError(where, f"its metadata '{NORM_META_KEY}' is {str(norm)[:40]!r}", f"one of {DECODER_NORMS}")
    text = metadata.get(BOUND_META_KEY, "0")
    try:
        bound = float(text)
    except ValueError:
        bound = float("nan")
    if not (bound == 0 or 0.1 <= bound <= 100):
        raise VAELoadError(where, f"its metadata '{BOUND_META_KEY}' is {str(text)[:40]!r}", "0 or a number from 0.1 to 100")
    return replace(config, decoder_norm=norm, latent_bound=bound)


def _config_from_metadata(text: str, notes: list) -> dict:
    try:
        extra = json.loads(text) if len(text) <= 100_000 else None
        if isinstance(extra, dict) and json_depth(extra) <= MAX_CONFIG_DEPTH:  # deeper would overflow JSON writers
            return {k: extra[k] for k in layouts.DIFFUSERS_EXTRA_FIELDS if k in extra}
    except (ValueError, RecursionError):
        pass
    notes.append(f"ignored unreadable '{CONFIG_META_KEY}' metadata")
    return {}


# ---------------------------------------------------------------- saving

def _save_parts(vae):
    """(state dict, config, metadata copy, diffusers extras, description of the source)."""
    if isinstance(vae, LoadedVAE):
        sd = vae.model.state_dict()
        return sd, vae.model.config, dict(vae.file.metadata), dict(vae.file.extra_config), f"'{vae.file.path}' (loaded model)"
    if isinstance(vae, VAEFile):
        return vae.state_dict, vae.config, dict(vae.metadata), dict(vae.extra_config), f"'{vae.path}' ({vae.layout} layout)"
    if isinstance(vae, AutoencoderKL):
        return vae.state_dict(), vae.config, {}, {}, "an in-memory AutoencoderKL"
    raise InputError("vae", f"a {type(vae).__name__} cannot be saved", "a LoadedVAE, VAEFile or AutoencoderKL")


def _string_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError("metadata", "safetensors metadata must map strings to strings", "a dict[str, str]")
    return dict(metadata)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Detached CPU tensor owning its storage (safetensors refuses views into shared storage)."""
    t = t.detach().to("cpu")
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t
