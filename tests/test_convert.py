"""Converting and checking VAE files: `convert_vae`, and the `convert` / `check` commands' exit codes,
messages and outputs (via subprocess and via cli.main)."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from run_cli import run_cli
from vae_fix import cli
from vae_fix.convert import ConvertResult, convert_vae
from vae_fix.errors import InputError, VAELoadError
from vae_fix.loader import read_vae
from vae_files import RunsShell, write_vae


def convert(*args):
    """Run the real CLI in a fresh interpreter."""
    return run_cli("convert", *args)


def test_subprocess_round_trip_is_bit_exact(tmp_path):
    src = write_vae(tmp_path, "sd", "checkpoint", "ckpt")
    to_diffusers = convert("--vae", src, "--to", "diffusers", "--out", tmp_path / "d", "--metadata", "license=test")
    assert to_diffusers.returncode == 0, to_diffusers.stderr
    assert "read" in to_diffusers.stdout and "compvis layout (torch-weights-only)" in to_diffusers.stdout
    assert "ignored 3 non-VAE tensors" in to_diffusers.stdout
    assert "wrote" in to_diffusers.stdout and "config.json" in to_diffusers.stdout
    back = convert("--vae", tmp_path / "d", "--to", "compvis", "--out", tmp_path / "back.safetensors")
    assert back.returncode == 0, back.stderr
    original = read_vae(src).state_dict
    result = load_file(str(tmp_path / "back.safetensors"))
    assert set(result) == set(original) and all(torch.equal(result[k], original[k]) for k in original)
    assert read_vae(tmp_path / "back.safetensors").metadata["license"] == "test"


def test_subprocess_bad_input_exits_2_without_traceback(tmp_path):
    result = convert("--vae", tmp_path / "nope.safetensors", "--to", "compvis", "--out", tmp_path / "o.safetensors")
    assert result.returncode == 2
    assert "Cannot load VAE" in result.stderr and "nope.safetensors" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.safetensors").exists()


def test_subprocess_usage_error_exits_2(tmp_path):
    result = convert("--vae", "x.safetensors", "--to", "onnx", "--out", tmp_path / "o")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_subprocess_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": RunsShell(marker)}}, protocol=2))
    result = convert("--vae", path, "--to", "compvis", "--out", tmp_path / "o.safetensors")
    assert result.returncode == 2 and "refused" in result.stderr and "evil.ckpt" in result.stderr
    assert not marker.exists()


def run_main(capsys, *args):
    code = cli.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_main_converts_to_single_diffusers_file(tmp_path, capsys):
    src = write_vae(tmp_path, "sd3", "diffusers", "folder")
    code, out, err = run_main(capsys, "--vae", src, "--to", "diffusers", "--out", tmp_path / "single.safetensors")
    assert code == 0, err
    assert "16-channel KL VAE" in out and "without quant_conv" in out
    assert "encoder.down_blocks.0.resnets.0.conv1.weight" in load_file(str(tmp_path / "single.safetensors"))


def test_main_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    src = write_vae(tmp_path, "sd")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    code, _, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", target)
    assert code == 2 and "already exists" in err and "--overwrite" in err and target.read_bytes() == b"keep me"
    code, _, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", target, "--overwrite")
    assert code == 0, err
    assert read_vae(target).config.latent_channels == 4


@pytest.mark.parametrize("args,expected", [
    (("--to", "compvis", "--out", "{tmp}/folder"), "does not end in .safetensors"),
    (("--to", "compvis", "--out", "{src}", "--overwrite"), "it is the input itself"),
    (("--to", "compvis", "--out", "{tmp}/o.safetensors", "--metadata", "novalue"), "is not KEY=VALUE"),
])
def test_main_rejects_bad_arguments(tmp_path, capsys, args, expected):
    src = write_vae(tmp_path, "sd")
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    code, _, err = run_main(capsys, "--vae", src, *args)
    assert code == 2 and expected in err and err.startswith("error: ")


def test_main_refuses_encoder_only_vae(tmp_path, capsys):
    src = write_vae(tmp_path, "svd", "diffusers", "folder")
    code, out, err = run_main(capsys, "--vae", src, "--to", "compvis", "--out", tmp_path / "svd.safetensors")
    assert code == 2 and "decoder was not loaded" in err
    assert "decoder not loaded" in out  # the note was printed before the refusal
    assert not (tmp_path / "svd.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_main_reports_damaged_input(tmp_path, capsys, damage):
    src = write_vae(tmp_path, "sd")
    if damage == "truncate":
        src.write_bytes(src.read_bytes()[:5000])
    else:
        from safetensors.torch import save_file
        sd = load_file(str(src))
        sd["decoder.conv_in.bias"][0] = float("nan")
        save_file(sd, str(src))
    code, _, err = run_main(capsys, "--vae", src, "--to", "diffusers", "--out", tmp_path / "o")
    assert code == 2 and src.name in err
    assert ("truncated" if damage == "truncate" else "decoder.conv_in.bias (1 NaN, 0 inf)") in err
    assert not (tmp_path / "o").exists()


def test_main_json_tells_what_was_read_and_written(tmp_path, capsys):
    src = write_vae(tmp_path, "sd3", "compvis")
    code, out, err = run_main(capsys, "--vae", src, "--to", "diffusers", "--out", tmp_path / "d", "--json")
    assert code == 0, err
    data = json.loads(out)  # nothing but the JSON on stdout
    assert data["read"]["layout"] == "compvis" and data["read"]["latent_channels"] == 16
    assert data["wrote"]["layout"] == "diffusers" and data["wrote"]["path"] == str(tmp_path / "d")
    assert sorted(data["wrote"]["files"]) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert data["wrote"]["tensors"] == data["read"]["tensors"] and data["wrote"]["bytes"] > 0


# ---------------------------------------------------------------- the engine call

def test_convert_vae_result_and_bit_exact_round_trip(tmp_path):
    src = write_vae(tmp_path, "sdxl", "diffusers", "folder", seed=4)
    seen = []
    result = convert_vae(src, "compvis", tmp_path / "c.safetensors", metadata={"license": "x"}, on_read=seen.append)
    assert isinstance(result, ConvertResult) and seen == [result.source]
    assert result.written == tmp_path / "c.safetensors" and result.to_json()["wrote"]["files"] == ["c.safetensors"]
    lines = result.summary().splitlines()
    assert lines[0].startswith(f"read   {src}: diffusers layout (diffusers-folder)")
    assert lines[-1].startswith(f"wrote  {tmp_path / 'c.safetensors'}: compvis layout")
    back = read_vae(result.written)
    assert back.metadata["license"] == "x" and back.extra_config == {"scaling_factor": 0.18215}
    original = read_vae(src).state_dict
    assert set(back.state_dict) == set(original)
    assert all(torch.equal(back.state_dict[k], original[k]) for k in original)


def test_convert_vae_checks_the_output_before_reading(tmp_path):
    missing = tmp_path / "nope.safetensors"  # not read: the output is refused first
    with pytest.raises(InputError, match="Invalid filename: .*does not end in .safetensors"):
        convert_vae(missing, "compvis", tmp_path / "out", out_name="filename")
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists.*overwrite=True"):
        convert_vae(missing, "compvis", tmp_path / "taken.safetensors")
    with pytest.raises(InputError, match="'onnx' is not a layout"):
        convert_vae(missing, "onnx", tmp_path / "x.safetensors")
    with pytest.raises(VAELoadError, match="no such file"):
        convert_vae(missing, "diffusers", tmp_path / "new")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep" and not (tmp_path / "new").exists()


# ---------------------------------------------------------------- python -m vae_fix check

@pytest.mark.parametrize("family,layout,container,channels,want_layout", [
    ("sd3", "diffusers", "folder", 16, "diffusers"), ("retrained8", "checkpoint", "ckpt", 8, "compvis")])
def test_check_prints_the_node_info(tmp_path, family, layout, container, channels, want_layout):
    src = write_vae(tmp_path, family, layout, container)
    result = run_cli("check", "--vae", src, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info == json.loads(json.dumps(read_vae(src).info()))  # the same info as Load VAE (strict)
    assert (info["latent_channels"], info["layout"], info["downscale"]) == (channels, want_layout, 4)
    text = run_cli("check", "--vae", src)
    assert text.returncode == 0 and f"{channels}-channel KL VAE" in text.stdout
    assert f"{want_layout} layout" in text.stdout and "note:" in text.stdout


def test_check_of_a_truncated_file_exits_2_naming_it(tmp_path):
    src = write_vae(tmp_path, "sd")
    src.write_bytes(src.read_bytes()[:3000])
    result = run_cli("check", "--vae", src, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert src.name in result.stderr and "truncated" in result.stderr and "Traceback" not in result.stderr
