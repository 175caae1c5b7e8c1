"""Strict, safe loading of every layout and container, the layouts module, and saving (refusals:
test_loader_errors.py)."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vae_fix.errors import InputError
from vae_fix.model import infer_config
from vae_fix.loader import LoadedVAE, load_vae, read_vae, save_vae
from vae_files import METADATA, random_compvis, reference_model, write_state_dict, write_vae

READABLE = [  # (layout, container, expected layout, expected container, expected prefix)
    ("compvis", "safetensors", "compvis", "safetensors", ""),
    ("compvis", "pt", "compvis", "torch-weights-only", ""),
    ("diffusers", "folder", "diffusers", "diffusers-folder", ""),
    ("diffusers", "folder_bin", "diffusers", "diffusers-folder", ""),
    ("diffusers", "pipeline", "diffusers", "diffusers-folder", ""),
    ("diffusers", "safetensors", "diffusers", "safetensors", ""),
    ("diffusers_old", "safetensors", "diffusers", "safetensors", ""),
    ("diffusers_conv", "ckpt", "diffusers", "torch-weights-only", ""),
    ("checkpoint", "safetensors", "compvis", "safetensors", "first_stage_model."),
    ("checkpoint", "ckpt", "compvis", "torch-weights-only", "first_stage_model."),
    ("vae_prefix", "safetensors", "compvis", "safetensors", "vae."),
]


# ---------------------------------------------------------------- reading every layout

# every layout for SD (quant convs) and SD3 (none); the other families in the two common layouts
READ_CASES = [(f, *r) for f in ("sd", "sd3") for r in READABLE] + \
    [(f, *r) for f in ("sdxl", "flux", "retrained8") for r in READABLE if r[1] in ("safetensors", "folder") and r[0] != "diffusers_old"]


@pytest.mark.parametrize("family,layout,container,want_layout,want_container,want_prefix", READ_CASES)
def test_reads_every_layout_bit_exactly(tmp_path, family, layout, container, want_layout, want_container, want_prefix):
    path = write_vae(tmp_path, family, layout, container, seed=3)
    vae = read_vae(path)
    assert (vae.layout, vae.container, vae.prefix) == (want_layout, want_container, want_prefix)
    expected = random_compvis(family, seed=3)
    assert set(vae.state_dict) == set(expected)
    assert all(torch.equal(vae.state_dict[k], expected[k]) for k in expected), "weights changed on the way in"
    assert vae.config == infer_config(expected)
    assert vae.config.decoder_kind == "kl"


def test_whole_checkpoint_reports_ignored_keys(tmp_path):
    vae = read_vae(write_vae(tmp_path, "sd", "checkpoint", "ckpt"))
    assert len(vae.ignored_keys) == 3
    joined = " ".join(vae.notes)
    assert "ignored 3 non-VAE tensors" in joined and "first_stage_model." in joined and "state_dict" in joined


def test_training_leftovers_are_ignored_and_reported(tmp_path):
    sd = random_compvis("sd")
    sd.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)})
    vae = read_vae(write_state_dict(sd, tmp_path / "vae.safetensors", "safetensors"))
    assert sorted(vae.ignored_keys) == ["loss.discriminator.main.0.weight", "loss.logvar"]
    assert any("ignored 2 non-VAE tensors" in n for n in vae.notes)


def test_safetensors_metadata_and_info(tmp_path):
    vae = read_vae(write_vae(tmp_path, "sd3", "diffusers", "folder"))
    assert vae.metadata == METADATA
    info = json.loads(json.dumps(vae.info()))
    assert info["latent_channels"] == 16 and info["downscale"] == 4 and info["layout"] == "diffusers"
    assert info["config"]["use_quant_conv"] is False and info["container"] == "diffusers-folder"
    assert info["extra_config"] == {"scaling_factor": 0.18215}
    assert any("converted diffusers key names" in n for n in info["notes"])


def test_load_vae_builds_a_frozen_model(tmp_path):
    path = write_vae(tmp_path, "retrained8", "diffusers", "folder")
    loaded = load_vae(path)
    assert isinstance(loaded, LoadedVAE) and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.model.moments(x), reference_model("retrained8").moments(x))
        assert loaded.model.decode(loaded.model.encode(x)).shape == (1, 3, 32, 32)
    assert loaded.info()["dtype"] == "float32" and loaded.config.latent_channels == 8


def test_load_vae_dtype(tmp_path):
    loaded = load_vae(write_vae(tmp_path, "sd"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.file.state_dict["encoder.conv_in.weight"].dtype == torch.float32  # the file is not touched
    with pytest.raises(InputError, match="dtype"):
        load_vae(write_vae(tmp_path, "sd"), dtype=torch.int64)
    with pytest.raises(InputError, match="device"):
        load_vae(write_vae(tmp_path, "sd"), device="no-such-device")


def test_half_precision_file_keeps_its_dtype(tmp_path):
    sd = {k: v.half() for k, v in random_compvis("sdxl").items()}
    vae = read_vae(write_state_dict(sd, tmp_path / "vae.safetensors", "safetensors"))
    assert vae.state_dict["decoder.conv_out.weight"].dtype == torch.float16
    assert any("float16" in n for n in vae.notes)


@pytest.mark.parametrize("layout,container", [("compvis", "safetensors"), ("diffusers", "folder"),
                                              ("diffusers", "safetensors"), ("checkpoint", "ckpt")])
def test_temporal_decoder_loads_encoder_only(tmp_path, layout, container):
    vae = load_vae(write_vae(tmp_path, "svd", layout, container))
    assert vae.config.decoder_kind == "none" and not vae.model.has_decoder
    assert not any(k.startswith(("decoder.", "post_quant_conv.")) for k in vae.file.state_dict)
    assert any("decoder not loaded" in n and "temporal" in n for n in vae.file.notes)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.model.moments(x), reference_model("svd").moments(x))
    with pytest.raises(RuntimeError, match="only its encoder"):
        vae.model.decode(torch.zeros(1, 4, 8, 8))


# ---------------------------------------------------------------- saving

def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_round_trip_compvis_diffusers_compvis(tmp_path, family):
    src = write_vae(tmp_path, family, "compvis", "safetensors")
    original = load_file(str(src))
    folder = save_vae(read_vae(src), tmp_path / "as_diffusers", layout="diffusers")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    back = save_vae(read_vae(folder), tmp_path / "back.safetensors", layout="compvis")
    assert_same_tensors(load_file(str(back)), original)


def test_round_trip_diffusers_compvis_diffusers(tmp_path):
    folder = write_vae(tmp_path, "retrained8", "diffusers", "folder")
    original = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    compvis = save_vae(read_vae(folder), tmp_path / "compvis.safetensors")
    again = save_vae(read_vae(compvis), tmp_path / "again", layout="diffusers")
    assert_same_tensors(load_file(str(again / "diffusion_pytorch_model.safetensors")), original)
    # what the weights cannot tell survives the CompVis file, in its metadata
    assert json.loads((again / "config.json").read_text())["scaling_factor"] == 0.18215


def test_half_precision_round_trip_stays_half(tmp_path):
    sd = {k: v.half() for k, v in random_compvis("sd").items()}
    src = write_state_dict(sd, tmp_path / "vae.safetensors", "safetensors")
    single = save_vae(read_vae(src), tmp_path / "diffusers_single.safetensors", layout="diffusers")
    assert "encoder.down_blocks.0.resnets.0.conv1.weight" in load_file(str(single))
    back = save_vae(read_vae(single), tmp_path / "back.safetensors")
    assert_same_tensors(load_file(str(back)), sd)


def test_metadata_preserved_and_noted(tmp_path):
    src = write_vae(tmp_path, "sd")
    out = save_vae(read_vae(src), tmp_path / "out", layout="diffusers", metadata={"license": "test"})
    meta = read_vae(out).metadata
    assert meta["modelspec.title"] == METADATA["modelspec.title"] and meta["license"] == "test"
    assert "vae_fix" in meta and "diffusers layout" in meta["vae_fix"] and src.name in meta["vae_fix"]


def test_save_loaded_model_and_bare_model(tmp_path):
    loaded = load_vae(write_vae(tmp_path, "flux"))
    a = save_vae(loaded, tmp_path / "a.safetensors")
    b = save_vae(loaded.model, tmp_path / "b.safetensors")
    assert_same_tensors(load_file(str(a)), load_file(str(b)))
    assert_same_tensors(read_vae(a).state_dict, loaded.file.state_dict)


def test_save_refuses_bad_requests(tmp_path):
    vae = read_vae(write_vae(tmp_path, "sd"))
    with pytest.raises(InputError, match="does not end in .safetensors"):
        save_vae(vae, tmp_path / "vae.ckpt", layout="compvis")
    with pytest.raises(InputError, match="'onnx' is not a layout"):
        save_vae(vae, tmp_path / "x.safetensors", layout="onnx")
    with pytest.raises(InputError, match="metadata"):
        save_vae(vae, tmp_path / "x.safetensors", metadata={"n": 1})
    encoder_only = read_vae(write_vae(tmp_path, "svd"))
    with pytest.raises(InputError, match="decoder was not loaded"):
        save_vae(encoder_only, tmp_path / "svd.safetensors")
    assert not (tmp_path / "svd.safetensors").exists()


def test_diffusers_loads_what_we_write(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = save_vae(read_vae(write_vae(tmp_path, "sdxl", seed=5)), tmp_path / "out", layout="diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    ours = reference_model("sdxl", seed=5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = theirs.encode(x).latent_dist.parameters
        err = ((ours.moments(x) - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5 and theirs.config.scaling_factor == 0.18215


# ---------------------------------------------------------------- layouts module

def test_detect_layout_and_prefixes():
    from vae_fix import layouts
    compvis = random_compvis("sd")
    diffusers = layouts.compvis_to_diffusers(compvis)
    assert layouts.detect_layout(compvis) == "compvis" and layouts.detect_layout(diffusers) == "diffusers"
    assert layouts.detect_layout(["encoder.down.0.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"]) == "mixed"
    assert layouts.detect_layout(["model.diffusion_model.input_blocks.0.0.weight"]) == "unknown"
    whole = {f"first_stage_model.{k}": v for k, v in diffusers.items()} | {"model.diffusion_model.x": torch.zeros(1)}
    sd, layout, prefix, ignored = layouts.to_compvis(whole)
    assert (layout, prefix, ignored) == ("diffusers", "first_stage_model.", ["model.diffusion_model.x"])
    assert set(sd) == set(compvis) and all(torch.equal(sd[k], compvis[k]) for k in sd)
    assert "first_stage_model.encoder.conv_in.weight" in whole  # the input is left as it was


def test_temporal_decoder_names_survive_both_directions():
    """SVD's sgm names → diffusers (spatial_res_block/temporal_res_block) → sgm, tensors untouched."""
    from vae_fix import layouts
    sgm = random_compvis("svd")
    diffusers = layouts.compvis_to_diffusers(sgm)
    assert {"decoder.mid_block.resnets.0.spatial_res_block.conv1.weight",
            "decoder.mid_block.resnets.0.temporal_res_block.conv1.weight",
            "decoder.mid_block.resnets.1.time_mixer.mix_factor", "decoder.time_conv_out.weight",
            "encoder.down_blocks.0.resnets.0.conv1.weight"} <= set(diffusers)
    back = layouts.diffusers_to_compvis(diffusers)
    assert set(back) == set(sgm) and all(back[k] is sgm[k] or torch.equal(back[k], sgm[k]) for k in sgm)


def test_a_checkpoints_other_weights_are_not_read(tmp_path):
    """In a whole checkpoint only the VAE's tensors are read; the rest (a diffusion model's
    gigabytes) stay on disk."""
    sd = {"first_stage_model." + k: v for k, v in random_compvis("sd").items()}
    sd["model.diffusion_model.big"] = torch.ones(64, 1024, 1024)  # 256 MiB
    path = write_state_dict(sd, tmp_path / "checkpoint.safetensors", "safetensors")
    rss = _resident_bytes()
    vae = read_vae(path)
    assert _resident_bytes() - rss < 100 * 2 ** 20
    assert vae.prefix == "first_stage_model." and "big" not in " ".join(vae.state_dict)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
