"""Load VAE (strict) for every VAE family the host builds (part of the host adapter, beside host.py).

A file the engine reads as a KL VAE (SD1.x/2.x, SDXL, SD3, Flux, retrained KL-F8, in CompVis or
diffusers names, bare or under a prefix) keeps the engine's full validation and goes through
`host.to_host_vae`, as before. Any other file (Wan, HunyuanVideo, Hunyuan Image, Mochi, LTXV, SVD,
Cosmos, ...) is read by the engine's bounded readers and handed to the host, which picks the family
from its sentinel keys (comfy/sd.py, `VAE.__init__`). Then the check core leaves out: every weight of
the host's model must come from the file, and every tensor of the file must be used, compared under
the names the host loads them by (after its own renamings: diffusers names, the prefixes it adds to
Mochi and Stable Cascade files).

The host is asked first on the meta device, with the file's shapes alone: a file it would load
partly, or whose shapes do not fit its model, is refused before any weight is allocated, and a model
that passes holds exactly the file's tensors (never more memory than the file's own size). A family
whose constructor needs real tensors (Cosmos') is only checked after it is built.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

import comfy.diffusers_convert
import comfy.sd

from ..vae_fix import loader
from ..vae_fix.codec import parse_dtype
from ..vae_fix.containers import RawWeights, read_container
from ..vae_fix.errors import InputError, VAELoadError
from ..vae_fix.finite import check_built, check_finite
from ..vae_fix.memory import is_out_of_memory
from ..vae_fix.model import check_padding, set_padding
from . import host
from .host_families import family_id

EXPECTED = ("the weights of a VAE family ComfyUI builds, as its Load VAE reads them: KL (SD1.x/2.x, SDXL, SD3, "
            "Flux), SVD, Wan 2.1/2.2, Qwen-Image, HunyuanVideo 1.0/1.5, Hunyuan Image 2.1, Mochi, LTXV, Cosmos, ...")
ENGINE_FAMILIES = ("kl", "kl_engine", "svd")  # the engine validates these files itself: its refusal stands
PADDABLE = ("kl", "kl_engine")  # KL image VAEs: retrained ones (EQ-VAE style) may need reflection padding

# The host renames a file's keys before loading them (comfy/sd.py, VAE.__init__), in this order.
_DIFFUSERS_SENTINEL = "decoder.up_blocks.0.resnets.0.norm1.weight"  # then comfy.diffusers_convert renames all
_ADDED_PREFIX = {  # family -> (sentinel, prefix the host puts before every key when the sentinel is there)
    "stage_c": (("backbone.1.0.block.0.1.num_batches_tracked", "encoder."), ("blocks.11.num_batches_tracked", "previewer.")),
    "mochi": (("blocks.2.blocks.3.stack.5.weight", "decoder."), ("layers.4.layers.1.attn_block.attn.qkv.weight", "encoder.")),
}
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def load_strict(path: str, name: str, dtype: str = "auto", padding: str = "zeros") -> tuple["comfy.sd.VAE", dict]:
    """(a standard `comfy.sd.VAE`, the node's info) for the VAE file or folder at `path` (`name`: as
    listed in models/vae). VAELoadError naming the file for anything the host would load partly."""
    check_padding(padding)
    raw = read_container(Path(path))
    try:
        vae_file = loader.validate_weights(raw, str(path), finite=False)  # checked below, once
    except VAELoadError as not_kl:
        vae, info = _host_family(raw, str(path), dtype, not_kl)
    else:
        if vae_file.config.decoder_kind == "kl":
            check_finite(vae_file.state_dict, str(path))
            vae = host.to_host_vae(vae_file, dtype, path=name)
            _check_float16_range(vae, vae_file.state_dict, str(path))
            info = vae_file.info()
            info["notes"] += vae.vae_fix_variant  # what the host's model was made to compute
        else:  # SVD: the engine reads only its encoder; the host builds it whole
            vae, info = _host_family(raw, str(path), dtype, None)
    key = family_id(vae.first_stage_model)
    return vae, {"name": name, **info, "family": key, "family_name": host.vae_kind(vae),
                 "padding": _pad(vae, padding), "comfyui": host.vae_summary(vae)}


def load_weights(raw: RawWeights, name: str, dtype: str = "auto") -> "comfy.sd.VAE":
    """A host VAE of any family from weights already in memory, checked as strictly as a file."""
    return _host_family(raw, name, dtype, None)[0]


def _check_float16_range(vae, sd: dict, path: str) -> None:
    """A model built in float16 from weights that all came from the file: finite weights beyond
    float16's range became inf there (VAELoadError naming them)."""
    if getattr(vae, "vae_dtype", None) == torch.float16:
        check_built(vae.first_stage_model, sd, path)


def _pad(vae, padding: str) -> str:
    """Switch a KL model's padded convolutions to `padding`; 'zeros' leaves any model as built."""
    if padding == "zeros":
        return "zeros (as ComfyUI builds the model)"
    if family_id(vae.first_stage_model) not in PADDABLE:
        raise InputError("padding", f"'{padding}' for a {host.vae_kind(vae)}, whose convolutions pad as its "
                         "family's code decides", "'zeros' for this VAE ('reflect' is for KL image VAEs retrained "
                         "with reflection padding, EQ-VAE style)")
    return f"{padding} ({set_padding(vae.first_stage_model, padding)} convolutions)"


# ---------------------------------------------------------------- a family the host builds

def _host_family(raw: RawWeights, path: str, dtype: str, not_kl: VAELoadError | None) -> tuple:
    sd = raw.tensors
    dry, wrong = _dry_run(sd, raw.metadata, path)
    if dry is not None:
        _check(dry, sd, path, not_kl, wrong)
    check_finite(sd, path)
    vae = _build(sd, raw.metadata, parse_dtype(dtype), path)
    notes = _check(vae, sd, path, not_kl)
    _check_float16_range(vae, sd, path)
    return vae, _info(raw, vae, path, notes)


def _dry_run(sd: dict, metadata: dict, path: str) -> tuple:
    """(the host's model built on the meta device from the file's shapes alone, nothing allocated;
    the file's tensors whose shapes do not fit it). Those tensors are given the model's shapes and it
    is built again, so that the family is known. (None, []) when the family's constructor needs real
    tensors."""
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    wrong = []
    for _ in range(2):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _construct(shapes, metadata, None, path), wrong
        except _Mismatch as e:
            if wrong or not all(k in shapes for k, _, _ in e.found):  # (under names the host gave them)
                raise _shape_error(path, wrong or e.described()) from None
            wrong = e.described()
            shapes.update({k: torch.empty(json.loads(model), dtype=shapes[k].dtype, device="meta")
                           for k, _, model in e.found})
        except VAELoadError:
            raise
        except Exception:  # e.g. Cosmos' patcher reads a value (.item()) while it is built: only a real build tells
            return None, []


def _build(sd: dict, metadata: dict, dtype, path: str) -> "comfy.sd.VAE":
    try:
        return _construct(sd, metadata, dtype, path)
    except _Mismatch as e:
        raise _shape_error(path, e.described()) from None
    except VAELoadError:
        raise
    except Exception as e:  # the host's constructor on untrusted weights: any failure is this file's
        if is_out_of_memory(e):
            raise
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise VAELoadError(path, f"ComfyUI could not build a model from it ({type(e).__name__}: {detail})",
                           EXPECTED) from None


class _Mismatch(Exception):
    """Tensors whose shapes do not fit the host's model: (key, file shape, model shape) each."""

    def __init__(self, found: list):
        super().__init__(found)
        self.found = found

    def described(self) -> list[str]:
        return [f"{k} {file} (expected {model})" for k, file, model in self.found]


def _shape_error(path: str, wrong: list[str], kind: str = "model of the family its keys name") -> VAELoadError:
    have = "tensor has" if len(wrong) == 1 else "tensors have"
    return VAELoadError(path, f"{len(wrong)} {have} the wrong shape for ComfyUI's {kind}",
                        "the shapes of that model (the file is damaged, or another variant of the family)", wrong)


def _construct(sd: dict, metadata: dict, dtype, path: str) -> "comfy.sd.VAE":
    """`comfy.sd.VAE` (which renames keys in the dict it gets: it gets a copy); _Mismatch for shapes
    that do not fit, VAELoadError for a key the host reads its sizes from that is missing."""
    try:
        return comfy.sd.VAE(sd=dict(sd), dtype=dtype, metadata=metadata or None)
    except KeyError as e:  # a family's sentinel was there, a key it reads its sizes from is not
        raise VAELoadError(path, f"ComfyUI chose a family by its keys, but the key {e.args[0]!r} it reads that "
                           "family's sizes from is missing", EXPECTED, keys=[e.args[0]]) from None
    except RuntimeError as e:  # load_state_dict raises shape mismatches even when not strict
        found = _SIZE_MISMATCH.findall(str(e))
        if not found:
            raise
        raise _Mismatch(found) from None


# ---------------------------------------------------------------- the strict check

def _check(vae, sd: dict, path: str, not_kl: VAELoadError | None, wrong: list = ()) -> list[str]:
    """Every weight of the host's model from the file with its shape (`wrong`: those without), every
    tensor of the file used; the notes."""
    fsm = vae.first_stage_model
    if fsm is None:
        raise _unrecognised(sd, path, not_kl)
    key = family_id(fsm)
    if not_kl is not None and key in ENGINE_FAMILIES:
        raise not_kl  # a KL (or SVD) file the engine found broken: its own, precise reason
    if wrong:
        raise _shape_error(path, list(wrong), f"{host.vae_kind(vae)} model")
    loaded, notes = _host_view(sd, key)
    model = set(fsm.state_dict())
    recomputed = sorted(_computed_buffers(fsm) & (set(loaded) - model))
    host.check_keys(path, host.vae_kind(vae), model, set(loaded) - set(recomputed))
    if recomputed:
        notes.append(f"{len(recomputed)} tensors are constants the model computes itself (not read): "
                     + ", ".join(recomputed[:4]) + (", ..." if len(recomputed) > 4 else ""))
    return notes


def _unrecognised(sd: dict, path: str, not_kl: VAELoadError | None) -> VAELoadError:
    why = f", and it is not a KL VAE either ({not_kl.problem})" if not_kl is not None else ""
    keys = (not_kl.keys if not_kl is not None else []) or sorted(sd)
    return VAELoadError(path, f"no VAE family matches its {len(sd)} tensors: ComfyUI recognises none of its "
                        f"families' keys{why}", EXPECTED, keys=keys)


def _host_view(sd: dict, family: str | None) -> tuple[dict, list[str]]:
    """The file's tensors under the names the host loads them by, and notes on each renaming."""
    notes = []
    if _DIFFUSERS_SENTINEL in sd:
        sd = comfy.diffusers_convert.convert_vae_state_dict(sd)
        notes.append("ComfyUI converted the diffusers key names to its own")
    for sentinel, prefix in _ADDED_PREFIX.get(family, ()):
        if sentinel in sd:  # checked again after each renaming, as the host does
            sd = {prefix + k: v for k, v in sd.items()}
            notes.append(f"the file's keys lack the '{prefix}' prefix: ComfyUI adds it to every key, as here")
    return sd, notes


def _computed_buffers(fsm: torch.nn.Module) -> set[str]:
    """Buffers the model computes itself and does not save (Cosmos' wavelet filters)."""
    return {name for name, _ in fsm.named_buffers(remove_duplicate=False)} - set(fsm.state_dict())


def _info(raw: RawWeights, vae, path: str, notes: list[str]) -> dict:
    fsm = vae.first_stage_model
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in raw.tensors.values()})
    return {"path": path, "layout": f"ComfyUI's {type(fsm).__name__}", "container": raw.container,
            "latent_channels": int(vae.latent_channels), "tensors": len(raw.tensors), "dtypes": dtypes,
            "parameters": sum(p.numel() for p in fsm.parameters()), "metadata_keys": sorted(raw.metadata),
            "notes": list(raw.notes) + notes}

