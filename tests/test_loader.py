"""Strict, safe loading: every layout and container, every way a file can be wrong, saving."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from vae_fix.errors import InputError, VAELoadError
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


def message(excinfo) -> str:
    return str(excinfo.value)


def sd_file(tmp_path, sd, name="vae.safetensors", container="safetensors"):
    return write_state_dict(sd, tmp_path / name, container)


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
    vae = read_vae(sd_file(tmp_path, sd))
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
    vae = read_vae(sd_file(tmp_path, sd))
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


# ---------------------------------------------------------------- refusing what is wrong

class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle_v2", "raw_pickle_v4"])
def test_code_running_pickle_is_refused_and_runs_nothing(tmp_path, payload, how):
    marker = tmp_path / "pwned"
    weights = {"encoder.conv_in.weight": torch.zeros(1), "evil": payload(marker)}
    path = tmp_path / "evil.ckpt"
    if how == "torch_zip":
        torch.save({"state_dict": weights}, path)
    else:
        path.write_bytes(pickle.dumps(weights, protocol=2 if how.endswith("v2") else 4))
    with pytest.raises(VAELoadError) as e:
        read_vae(path)
    assert not marker.exists(), "loading ran code from the pickle"
    assert "evil.ckpt" in message(e) and "refused" in message(e) and "nothing in the file was run" in message(e)
    if how == "torch_zip":  # raw pickles may first trip over how plain pickle stores a tensor
        assert ("system" if payload is RunsShell else "open") in message(e)


def test_the_malicious_pickle_really_runs_code_without_weights_only(tmp_path):
    """Control: the crafted file does run code when unpickled the unsafe way."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": RunsShell(marker)}, protocol=2))
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_nonexistent_path(tmp_path):
    with pytest.raises(VAELoadError) as e:
        read_vae(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in message(e) and "no such file or folder" in message(e)
    assert "diffusers folder" in message(e)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(VAELoadError) as e:
        read_vae(tmp_path / name)
    assert name in message(e) and "empty (0 bytes)" in message(e)


@pytest.mark.parametrize("keep", [4, 100, 0.5])
def test_truncated_safetensors(tmp_path, keep):
    path = write_vae(tmp_path, "sd")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(VAELoadError) as e:
        read_vae(path)
    assert path.name in message(e)
    assert "truncated" in message(e) and "complete .safetensors" in message(e)


def test_truncated_ckpt(tmp_path):
    path = write_vae(tmp_path, "sd", container="ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VAELoadError) as e:
        read_vae(path)
    assert path.name in message(e) and "truncated or corrupt" in message(e)


@pytest.mark.parametrize("name", ["noise.safetensors", "noise.ckpt", "noise.pt"])
def test_random_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                                dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(VAELoadError) as e:
        read_vae(tmp_path / name)
    assert name in message(e)
    assert any(w in message(e) for w in ("not a valid safetensors", "corrupt", "cannot read it"))


def test_unknown_extension(tmp_path):
    (tmp_path / "vae.txt").write_text("hello")
    with pytest.raises(VAELoadError, match=r"unknown file type '\.txt'"):
        read_vae(tmp_path / "vae.txt")


def test_torch_file_that_is_not_a_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(VAELoadError, match="holds a list, not a dict of tensors"):
        read_vae(tmp_path / "list.pt")


def test_unet_state_dict_is_not_a_vae(tmp_path):
    unet = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "time_embed.0.weight": torch.zeros(1280, 320),
            "middle_block.1.proj_in.weight": torch.zeros(1280, 1280)}
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, unet, "unet.safetensors"))
    text = message(e)
    assert "unet.safetensors" in text and "not a VAE" in text and "input_blocks.0.0.weight" in text
    assert "encoder.conv_in.weight" in text  # what was expected


def test_missing_keys(tmp_path):
    sd = random_compvis("sd")
    del sd["decoder.up.0.block.1.conv2.weight"], sd["encoder.mid.attn_1.q.bias"]
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    text = message(e)
    assert "vae.safetensors" in text and "2 of the" in text and "are missing" in text
    assert "encoder.mid.attn_1.q.bias" in text and "decoder.up.0.block.1.conv2.weight" in text
    assert "4-channel KL VAE" in text


def test_key_needed_for_the_architecture_missing(tmp_path):
    sd = random_compvis("sd")
    del sd["encoder.conv_out.weight"]
    with pytest.raises(VAELoadError, match=r"'encoder\.conv_out\.weight'.*is missing"):
        read_vae(sd_file(tmp_path, sd))


def test_missing_decoder(tmp_path):
    sd = {k: v for k, v in random_compvis("sd").items() if not k.startswith("decoder.")}
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    assert "are missing" in message(e) and "decoder.conv_in.weight" in message(e)


def test_quant_conv_without_post_quant_conv(tmp_path):
    sd = {k: v for k, v in random_compvis("sd").items() if not k.startswith("post_quant_conv.")}
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    assert "post_quant_conv.weight" in message(e) and "missing" in message(e)


def test_unexpected_keys(tmp_path):
    sd = random_compvis("sd")
    sd["encoder.mid.attn_1.extra.weight"] = torch.zeros(3)
    sd["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    text = message(e)
    assert "2 tensors that a 4-channel KL VAE" in text and "does not have" in text
    assert "encoder.mid.attn_1.extra.weight" in text and "model.diffusion_model.out.0.weight" in text


def test_wrong_shape(tmp_path):
    sd = random_compvis("sd")
    sd["encoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    text = message(e)
    assert "wrong shape" in text
    assert "encoder.mid.block_1.conv1.weight [64, 64, 1, 1] (expected [64, 64, 3, 3])" in text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(tmp_path, bad):
    sd = random_compvis("sd")
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = bad
    sd["encoder.norm_out.bias"][3] = bad
    with pytest.raises(VAELoadError) as e:
        read_vae(sd_file(tmp_path, sd))
    text = message(e)
    assert "2 tensors contain NaN or infinite values" in text
    assert "decoder.conv_out.weight" in text and "encoder.norm_out.bias" in text
    assert ("1 NaN" if bad != bad else "1 inf") in text


def test_integer_weights(tmp_path):
    sd = random_compvis("sd")
    sd["encoder.conv_in.bias"] = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(VAELoadError, match=r"not floating point.*encoder\.conv_in\.bias \(torch\.int32\)"):
        read_vae(sd_file(tmp_path, sd))


def test_mixed_layouts(tmp_path):
    sd = random_compvis("sd")
    sd["encoder.down_blocks.0.resnets.0.conv1.weight"] = sd.pop("encoder.down.0.block.0.conv1.weight")
    with pytest.raises(VAELoadError, match="mix the CompVis and diffusers layouts"):
        read_vae(sd_file(tmp_path, sd))


def test_folder_without_config(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(VAELoadError) as e:
        read_vae(tmp_path / "stuff")
    assert "stuff" in message(e) and "without config.json" in message(e) and "vae/ subfolder" in message(e)


def test_folder_without_weights(tmp_path):
    folder = write_vae(tmp_path, "sd", "diffusers", "folder")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(VAELoadError, match="no weights file next to config.json.*diffusion_pytorch_model.safetensors"):
        read_vae(folder)


def test_folder_with_broken_config(tmp_path):
    folder = write_vae(tmp_path, "sd", "diffusers", "folder")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(VAELoadError, match=r"config\.json'.*not a valid config file"):
        read_vae(folder)


@pytest.mark.parametrize("field,value,said", [
    ("latent_channels", 16, "latent_channels is 16 in config.json but 4 in the weights"),
    ("block_out_channels", [32, 64, 128], "block_out_channels is [32, 64, 128] in config.json but [32, 64, 64]"),
    ("use_quant_conv", False, "use_quant_conv is False in config.json but True"),
    ("layers_per_block", 2, "layers_per_block is 2 in config.json but 1"),
    ("norm_num_groups", 16, "norm_num_groups is 16 in config.json but 32"),
])
def test_config_json_disagreeing_with_weights(tmp_path, field, value, said):
    folder = write_vae(tmp_path, "sd", "diffusers", "folder")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VAELoadError) as e:
        read_vae(folder)
    assert "config.json disagrees with the weights" in message(e) and said in message(e)


def test_config_json_of_another_model(tmp_path):
    folder = write_vae(tmp_path, "sd", "diffusers", "folder")
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(VAELoadError, match="describes a AutoencoderTiny, not a KL autoencoder"):
        read_vae(folder)


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
    src = sd_file(tmp_path, sd)
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


def test_two_vaes_in_one_file_is_an_error(tmp_path):
    sd = random_compvis("sd")
    both = sd | {f"first_stage_model.{k}": v.clone() for k, v in sd.items()}
    with pytest.raises(VAELoadError, match="more than one prefix .*'first_stage_model.' and no prefix"):
        read_vae(sd_file(tmp_path, both))
