"""Strict loading refuses what is wrong: code-running pickles, damaged files, files that are not
a VAE, missing/unexpected/misshaped/non-finite tensors, mixed layouts, config.json disagreeing."""
import json
import pickle

import pytest
import torch

from vae_fix.errors import VAELoadError
from vae_fix.loader import read_vae
from vae_files import OpensFile, RunsShell, random_compvis, write_state_dict, write_vae


def message(excinfo) -> str:
    return str(excinfo.value)


def sd_file(tmp_path, sd, name="vae.safetensors"):
    return write_state_dict(sd, tmp_path / name, "safetensors")


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



def test_two_vaes_in_one_file_is_an_error(tmp_path):
    sd = random_compvis("sd")
    both = sd | {f"first_stage_model.{k}": v.clone() for k, v in sd.items()}
    with pytest.raises(VAELoadError, match="more than one prefix .*'first_stage_model.' and no prefix"):
        read_vae(sd_file(tmp_path, both))


def test_config_json_is_checked_against_the_inferred_norm_groups():
    from dataclasses import replace
    from vae_fix import layouts
    from vae_fix.model import infer_config
    config = infer_config(random_compvis("sd"))
    said = layouts.diffusers_config(config)  # written for GroupNorm(32)
    layouts.check_diffusers_config(said, config, False, "config.json")
    with pytest.raises(VAELoadError, match=r"norm_num_groups is 32 in config.json but 16 in the weights.*GroupNorm\(16\)"):
        layouts.check_diffusers_config(said, replace(config, norm_groups=16), False, "config.json")


def test_check_finite_names_the_non_finite_weights_of_any_family_and_leaves_counters_alone():
    from vae_fix.loader import check_finite
    sd = {"encoder.conv1.weight": torch.ones(2, 3), "decoder.head.0.gamma": torch.tensor([1.0, float("nan"), float("inf")]),
          "backbone.1.0.block.0.1.num_batches_tracked": torch.tensor(7)}  # an integer counter (Stable Cascade)
    with pytest.raises(VAELoadError) as e:
        check_finite(sd, "wan.safetensors")
    assert "'wan.safetensors'" in message(e) and "1 tensors contain NaN" in message(e)
    assert "decoder.head.0.gamma (1 NaN, 1 inf)" in message(e) and "encoder.conv1.weight" not in message(e)
    check_finite({k: v for k, v in sd.items() if "gamma" not in k}, "wan.safetensors")  # nothing to say


def test_validate_weights_is_read_vae_on_what_a_container_held(tmp_path):
    from vae_fix.containers import read_container
    from vae_fix.loader import validate_weights
    path = write_vae(tmp_path, "sd", layout="diffusers")
    read, validated = read_vae(path), validate_weights(read_container(path), str(path))
    assert validated.info() == read.info() and validated.state_dict.keys() == read.state_dict.keys()


def test_check_finite_is_exact_in_every_stored_precision():
    from vae_fix.loader import check_finite
    big = torch.full((1 << 16,), 60000.0, dtype=torch.float16)  # finite, though any sum of it overflows
    check_finite({"a.weight": big, "empty.weight": torch.zeros(0, 3)}, "big.safetensors")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):  # aminmax has no float8 kernel: read as float32
        bad = torch.ones(5, dtype=dtype)
        bad[2] = float("nan")
        with pytest.raises(VAELoadError, match=r"b\.weight \(1 NaN, 0 inf\)"):
            check_finite({"a.weight": big, "b.weight": bad}, "mixed.safetensors")
