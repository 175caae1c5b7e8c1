"""The public loading API, as a script would use it: `from vae_fix import load_vae, VAELoadError`."""
import subprocess
import sys

import pytest
import torch

from run_cli import ROOT
from vae_files import write_vae


def test_load_vae_and_its_error_are_importable_from_the_package_and_work(tmp_path):
    from vae_fix import VAELoadError, inspect_vae, load_vae
    path = write_vae(tmp_path, "sd")
    vae = load_vae(path)
    assert vae.config.latent_channels == 4 and not any(p.requires_grad for p in vae.model.parameters())
    verdict = inspect_vae(vae.codec(), torch.rand(1, 3, 64, 64)).verdict  # a random VAE: nothing collapsed
    assert verdict.status == "none" and not verdict.black_hole
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VAELoadError, match="broken.safetensors"):
        load_vae(broken)


def test_the_package_imports_without_torch_work_and_names_unknown_attributes():
    code = ("import sys, vae_fix; assert 'torch' not in sys.modules, 'import vae_fix loaded torch'; "
            "assert 'load_vae' in dir(vae_fix)\ntry:\n vae_fix.nothing\nexcept AttributeError as e:\n print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "has no attribute 'nothing'" in out.stdout
