"""Strict, safe VAE loading and saving in every layout. Loading never lies: it either returns a
complete, finite, correctly shaped VAE with notes on everything it did, or raises VAELoadError
naming the file, the problem, the first offending keys and what was expected.

Reads `.safetensors`/`.sft` (metadata returned), diffusers folders (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`, also a pipeline folder's `vae/`) and
`.ckpt/.pt/.pth/.bin` only through `torch.load(weights_only=True)`, so a pickle that would run
code is refused and nothing in it runs. Key layouts: CompVis, diffusers (old and new attention
names), whole checkpoints (`first_stage_model.`), `vae.` prefix (see `layouts`).

Saving (`save_vae`): `layout="compvis"` writes one `.safetensors` file; `layout="diffusers"` writes
a folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a single diffusers-named
`.safetensors` file when the path ends in `.safetensors`. Tensors are written as they are (same
dtype and values), so conversions round-trip bit-exactly.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__, layouts
from .errors import InputError, VAELoadError
from .model import AutoencoderKL, VAEConfig, infer_config, is_foreign_decoder

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXPECTED_INPUT = ("a .safetensors file, a .ckpt/.pt/.pth/.bin weights file, or a diffusers folder "
                  "(config.json + diffusion_pytorch_model.safetensors)")
CONFIG_META_KEY = "vae_fix.diffusers_config"  # diffusers-only settings kept inside CompVis files
MAX_HEADER = 100_000_000                      # the safetensors format's own limit


@dataclass
class VAEFile:
    """A validated VAE read from disk. `state_dict` is CompVis layout, no prefix (what
    `comfy.sd.VAE(sd=...)` accepts), tensors as stored (dtype unchanged)."""
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

    def info(self) -> dict:
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.to_dict().items()}
        return {
            "path": self.path, "layout": self.layout, "container": self.container, "prefix": self.prefix,
            "latent_channels": self.config.latent_channels, "downscale": self.config.downscale,
            "decoder": self.config.decoder_kind, "tensors": len(self.state_dict),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in self.state_dict.values()}),
            "ignored_keys": len(self.ignored_keys), "config": cfg, "extra_config": dict(self.extra_config),
            "metadata_keys": sorted(self.metadata), "notes": list(self.notes),
        }


@dataclass
class LoadedVAE:
    model: AutoencoderKL
    file: VAEFile

    @property
    def config(self) -> VAEConfig:
        return self.model.config

    def info(self) -> dict:
        p = next(self.model.parameters())
        return {**self.file.info(), "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
                "parameters": sum(t.numel() for t in self.model.parameters())}

    def codec(self, name: str | None = None, input_name: str = "--vae"):
        """This model as the engine's `Codec` (what every feature that needs a VAE takes)."""
        from .codec import model_codec
        return model_codec(self.model, name or Path(self.file.path).name, self.info(), input_name)


@dataclass
class _Raw:
    tensors: dict
    weights_path: Path
    container: str
    metadata: dict = field(default_factory=dict)
    config_json: dict | None = None
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------- public API

def read_vae(path) -> VAEFile:
    """Read and validate a VAE in any supported container and layout (tensors stay on CPU)."""
    raw = _read_container(Path(path))
    return _validate(raw, str(path))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The validated CompVis-layout state dict of a VAE file or folder."""
    return read_vae(path).state_dict


def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32) -> LoadedVAE:
    """Read, validate and build the model: eval mode, requires_grad False, on `device` in `dtype`.

    Where the file's dtype and `device` match, the parameters share storage with `file.state_dict`.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError("dtype", f"{dtype!r} is not a floating point torch dtype", "torch.float32, float16 or bfloat16")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        raise InputError("device", f"{device!r} cannot be used ({e})", "'cpu' or an available accelerator such as 'cuda'") from None
    file = read_vae(path)
    with torch.device("meta"):
        model = AutoencoderKL(file.config)
    # No second copy of the weights: where dtype and device already match, the model's parameters
    # share storage with file.state_dict (treat both as read-only).
    weights = {k: v.to(device=device, dtype=dtype) for k, v in file.state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return LoadedVAE(model.eval().requires_grad_(False), file)


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
    if single_file:
        if extra:
            meta[CONFIG_META_KEY] = json.dumps(extra, sort_keys=True)
        return _write_safetensors(tensors, path, meta)
    if path.exists() and not path.is_dir():
        raise InputError("output path", f"'{path}' is an existing file", "a folder path for the diffusers layout (or a .safetensors path)")
    meta.pop(CONFIG_META_KEY, None)  # the folder's config.json carries these
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, path / WEIGHT_NAMES[0], meta)
    (path / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- containers

def _read_container(path: Path) -> _Raw:
    if not path.exists():
        raise VAELoadError(path, "no such file or folder", EXPECTED_INPUT)
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise VAELoadError(path, f"unknown file type '{suffix or '(no extension)'}'", EXPECTED_INPUT)


def _check_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise VAELoadError(path, f"cannot read it ({e.strerror})", EXPECTED_INPUT) from None
    if size == 0:
        raise VAELoadError(path, "the file is empty (0 bytes)", "a complete weights file (the download or copy may have failed)")
    return size


def _read_safetensors(path: Path) -> _Raw:
    size = _check_size(path)
    expected = "a complete .safetensors file (8-byte header length, JSON header, tensor data)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 0 or n > min(size - 8, MAX_HEADER):
            raise VAELoadError(path, f"not a valid safetensors file: it is {size} bytes but its first 8 bytes give a "
                               f"header length of {n} bytes (truncated, or not a safetensors file)", expected)
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise VAELoadError(path, f"corrupt safetensors header ({type(e).__name__}: {e})", expected) from None
    needed = 8 + n + max(ends, default=0)
    if needed > size:
        raise VAELoadError(path, f"truncated: its header describes {needed} bytes of data but the file has {size}", expected)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise VAELoadError(path, f"corrupt safetensors file ({type(e).__name__}: {e})", expected) from None
    return _Raw(tensors, path, "safetensors", metadata)


def _read_torch(path: Path) -> _Raw:
    _check_size(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is reported below
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VAELoadError(path, _refusal(str(e)), "a plain weights file (tensors in dicts), or a .safetensors file") from None
    except Exception as e:  # zip, pickle and storage errors all mean the same thing here
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise VAELoadError(path, f"not a readable PyTorch weights file, truncated or corrupt ({detail})",
                           "a complete .ckpt/.pt/.pth/.bin saved by torch.save") from None
    notes = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        others = sorted(str(k) for k in obj if k != "state_dict")
        notes.append("weights were wrapped in 'state_dict'" + (f" (also held: {', '.join(others[:5])})" if others else ""))
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise VAELoadError(path, f"it holds a {type(obj).__name__}, not a dict of tensors", "a state dict (name → tensor)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad := [k for k in skipped if k.startswith(layouts.VAE_ROOTS)]:
        raise VAELoadError(path, "some VAE entries are not tensors", "a tensor for every weight", bad)
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries ({', '.join(skipped[:5])})")
    return _Raw(tensors, path, "torch-weights-only", notes=notes)


def _refusal(message: str) -> str:
    """Why torch's weights-only unpickler said no, in the user's terms."""
    wanted = re.search(r"GLOBAL ([\w.]+)", message)
    if wanted:
        return (f"refused: unpickling it would call or build '{wanted.group(1)}', which a weights-only load never "
                "allows (a weights file does not need it; nothing in the file was run)")
    opcode = re.search(r"[Uu]nsupported operand (\d+)", message)
    step = f" (pickle opcode {opcode.group(1)})" if opcode else ""
    return (f"refused: the weights-only unpickler cannot read it{step}; it is corrupt, not a PyTorch file, or a "
            "pickle that builds arbitrary objects (nothing in the file was run)")


def _read_folder(path: Path) -> _Raw:
    folder, notes = path, []
    if not (folder / "config.json").is_file():
        if not (path / "vae" / "config.json").is_file():
            raise VAELoadError(path, "a folder without config.json (and without vae/config.json)",
                               "a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) "
                               "or a pipeline folder with a vae/ subfolder")
        folder = path / "vae"
        notes.append("read the vae/ subfolder of a pipeline folder")
    try:
        config_json = json.loads((folder / "config.json").read_text())
        if not isinstance(config_json, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise VAELoadError(folder / "config.json", f"not a valid config file ({e})", "a diffusers config.json (a JSON object)") from None
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors")) + sorted(folder.glob("diffusion_pytorch_model.*.bin"))
    weights = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()] + variants
    if not weights:
        raise VAELoadError(folder, "no weights file next to config.json", f"{WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]})")
    if weights[0].name not in WEIGHT_NAMES:
        notes.append(f"read the variant weights file {weights[0].name}")
    raw = _read_safetensors(weights[0]) if weights[0].suffix == ".safetensors" else _read_torch(weights[0])
    return replace(raw, container="diffusers-folder", config_json=config_json, notes=notes + raw.notes)


# ---------------------------------------------------------------- validation

def _validate(raw: _Raw, path: str) -> VAEFile:
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
    config = _infer(sd, where)
    _check_keys(sd, config, foreign, where)
    _check_values(sd, where)
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
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise VAELoadError(where, f"its tensor shapes do not form a KL VAE ({e})", "4-D convolution weights") from None


def describe(config: VAEConfig) -> str:
    widths = "/".join(str(config.base_channels * m) for m in config.channel_mult)
    quant = "with" if config.use_quant_conv else "without"
    return (f"{config.latent_channels}-channel KL VAE (widths {widths}, {config.num_res_blocks} res blocks per level, "
            f"{quant} quant_conv)")


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


def _check_values(sd: dict, where: str) -> None:
    not_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise VAELoadError(where, "some weights are not floating point", "float32, float16 or bfloat16 weights", not_float)
    bad = [_non_finite(k, v) for group in _groups(sd) if not _all_finite(group.values()) for k, v in group.items()]
    bad = [b for b in bad if b]
    if bad:
        raise VAELoadError(where, f"{len(bad)} tensors contain NaN or infinite values",
                           "finite weights (the file is damaged or came from a diverged training run)", bad)


def _groups(sd: dict, elements: int = 1 << 24):
    """Tensors in groups of about `elements` values: one finiteness check per group, not per tensor."""
    group, size = {}, 0
    for k, v in sd.items():
        group[k], size = v, size + v.numel()
        if size >= elements:
            yield group
            group, size = {}, 0
    if group:
        yield group


def _all_finite(tensors) -> bool:
    return bool(torch.isfinite(torch.cat([t.reshape(-1).float() for t in tensors])).all())


def _non_finite(key: str, v: torch.Tensor) -> str | None:
    v = v.float()
    nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    return f"{key} ({nan} NaN, {inf} inf)" if nan or inf else None


def _config_from_metadata(text: str, notes: list) -> dict:
    try:
        extra = json.loads(text)
        if isinstance(extra, dict):
            return {k: extra[k] for k in layouts.DIFFUSERS_EXTRA_FIELDS if k in extra}
    except ValueError:
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


def _write_safetensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """Write next to the target and rename, so an interrupted save never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
