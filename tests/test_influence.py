import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vae_fix.cli import main
from vae_fix.latent_io import write_latent
from vae_fix.loader import save_vae

from vae_fix.errors import InputError
from vae_fix.influence import (exact_reach, fast_reach_map, neighbour_median, perturbation, reach_to_map,
                               summarize_map, top_cells)
from vae_fix.model import AttnBlock, preset_config, random_vae

SPIKES = [((3, 3), 48.0), ((12, 12), 30.0), ((3, 12), 19.0), ((12, 3), 12.0), ((8, 8), 8.0)]


@pytest.fixture(scope="module")
def sd_small():
    """Random-weight decoder in the SD layout: GroupNorm(32) everywhere, attention in the mid block."""
    vae = random_vae(preset_config("sd", small=True), seed=2)
    assert isinstance(vae.decoder.mid.attn_1, AttnBlock)
    assert all(m.num_groups == 32 for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm))
    return vae


def spiked_latent(seed=2):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    for (y, x), s in SPIKES:
        z[0, :, y, x] = s
    return z


@pytest.fixture(scope="module")
def spiked_exact(sd_small):
    z = spiked_latent()
    return z, exact_reach(sd_small.decode, z, window=2, batch_size=32)


def test_spikes_ranked_first_in_the_same_order_by_both_measures(sd_small, spiked_exact):
    z, exact = spiked_exact
    spikes = [c for c, _ in SPIKES]
    with torch.inference_mode():  # as inside a ComfyUI node
        fast = fast_reach_map(sd_small.decode, z, window=2)
    assert fast.passes == 9
    for key in ("mean_far", "rms_far"):
        exact_map = reach_to_map(exact, 16, 16, key)
        assert top_cells(exact_map, 5) == spikes, key
        assert float(exact_map[spikes[0]]) >= 10 * float(exact_map.median())
    assert top_cells(fast.reach, 5) == spikes
    summary = summarize_map(fast.reach)
    assert summary["max_over_median"] >= 10
    assert [(c["y"], c["x"]) for c in summary["top_cells"]] == spikes


def test_fast_map_is_the_first_order_of_what_it_estimates(sd_small):
    """For a tiny perturbation the fast map equals the exact far-region mean change."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cells = [(0, 0), (5, 9), (15, 2), (8, 8)]
    exact = exact_reach(sd_small.decode, z, cells, mode="scale", factor=1.01, window=2)
    fast = fast_reach_map(sd_small.decode, z, mode="scale", factor=1.01, window=2)
    for r in exact:
        assert float(fast.reach[r.y, r.x]) == pytest.approx(r.region_far, rel=0.05)


def local_plus_global(z):
    """A linear toy decoder: 4x nearest upsampling of 3 channels plus the latent mean everywhere."""
    local = F.interpolate(z[:, :3] * 0.1, scale_factor=4, mode="nearest")
    return local + 0.5 * z[:, :3].mean(dim=(2, 3), keepdim=True)


def test_exact_measure_separates_near_and_far():
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    delta = perturbation(z, "zero")
    (r,) = exact_reach(local_plus_global, z, [(5, 6)], mode="zero", window=1)
    glob = (0.5 * delta[0, :3, 5, 6] / 144 / 2).abs()      # /2: -1..1 → 0..1
    own = (0.1 * delta[0, :3, 5, 6] / 2 + 0.5 * delta[0, :3, 5, 6] / 144 / 2).abs()
    assert r.mean_far == pytest.approx(float(glob.mean()), rel=1e-4)
    assert r.max_far == pytest.approx(float(glob.mean()), rel=1e-4)
    near_pixels = 9 * 16  # 3x3 cells of 4x4 px
    expected_near = (float(own.mean()) * 16 + float(glob.mean()) * (near_pixels - 16)) / near_pixels
    assert r.mean_near == pytest.approx(expected_near, rel=1e-4)
    assert r.ratio == pytest.approx(r.mean_far / r.mean_near)
    fast = fast_reach_map(local_plus_global, z, mode="zero", window=1)  # linear decoder: exact
    assert float(fast.reach[5, 6]) == pytest.approx(r.region_far, rel=1e-4)


def test_window_edge_is_exact_for_a_purely_local_decoder():
    z = torch.randn(1, 4, 12, 12)
    reach = exact_reach(lambda t: F.interpolate(t[:, :3], scale_factor=8), z, [(0, 0), (6, 6), (11, 3)], window=1)
    assert all(r.mean_far == 0 and r.max_far == 0 and r.mean_near > 0 for r in reach)


def test_inference_mode_inputs_untouched_and_same_result(sd_small):
    with torch.inference_mode():
        z = spiked_latent()  # an inference tensor, as ComfyUI hands it over
        inside = fast_reach_map(sd_small.decode, z, window=2)
    snapshot = z.clone()
    outside = fast_reach_map(sd_small.decode, z, window=2)
    assert torch.equal(z, snapshot)
    torch.testing.assert_close(inside.reach, outside.reach)
    assert all(p.grad is None for p in sd_small.parameters())


def test_progress_counts_and_cancels(sd_small):
    z = spiked_latent()
    seen = []
    exact_reach(sd_small.decode, z, [(0, 0), (1, 1), (2, 2)], window=2, batch_size=2,
                progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (2, 3), (3, 3)]
    seen.clear()
    fast_reach_map(sd_small.decode, z, window=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 9) and seen[-1] == (9, 9) and len(seen) == 10

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done:
            raise Cancelled

    with pytest.raises(Cancelled):
        fast_reach_map(sd_small.decode, z, window=2, progress=cancel)
    with pytest.raises(Cancelled):
        exact_reach(sd_small.decode, z, window=2, progress=cancel)


def test_neighbour_median():
    z = torch.arange(16.0).view(1, 1, 4, 4)
    med = neighbour_median(z)
    assert float(med[0, 0, 0, 0]) == 4.0       # neighbours 1, 4, 5 → 4
    assert float(med[0, 0, 1, 1]) == 4.0       # 0,1,2,4,6,8,9,10 → lower median 4
    exclude = torch.zeros(1, 4, 4, dtype=torch.bool)
    exclude[0, 0, 1] = exclude[0, 1, 0] = True
    assert float(neighbour_median(z, exclude)[0, 0, 0, 0]) == 5.0
    exclude[0, 1, 1] = True
    assert torch.isnan(neighbour_median(z, exclude)[0, 0, 0, 0])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="blur"), "unknown perturbation"), (dict(mode="scale", factor=1.0), "changes nothing"),
    (dict(window=8), "no far field"), (dict(window=3), "does not fit"), (dict(index=1), "outside the batch"),
    (dict(blocks=1), "blocks"),
])
def test_fast_map_bad_arguments(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        fast_reach_map(local_plus_global, torch.zeros(1, 4, 16, 16), **kwargs)


def test_exact_bad_cells():
    with pytest.raises(InputError, match=r"cell \(16, 0\) is outside the 16x16 latent"):
        exact_reach(local_plus_global, torch.zeros(1, 4, 16, 16), [(16, 0)], window=2)
    with pytest.raises(InputError, match="not a \\(y, x\\) pair"):
        exact_reach(local_plus_global, torch.zeros(1, 4, 16, 16), ["a"], window=2)


# ---------------------------------------------------------------- CLI

ROOT = Path(__file__).resolve().parents[1]


def strict_json(path):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, sd_small):
    d = tmp_path_factory.mktemp("influence_cli")
    return {"vae": save_vae(sd_small, d / "sd_small.safetensors"),
            "latent": write_latent(spiked_latent(), d / "spiked.latent")}


def test_cli_influence_ranks_the_spikes(cli_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["influence", "--vae", str(cli_files["vae"]), "--latent", str(cli_files["latent"]),
               "--out", str(out), "--window", "2", "--exact", "5"])
    assert rc == 0
    data = strict_json(out / "influence.json")
    spikes = [list(c) for c, _ in SPIKES]
    assert [[c["y"], c["x"]] for c in data["fast"]["top_cells"][:5]] == spikes
    assert [[r["y"], r["x"]] for r in data["exact"]] == spikes
    assert data["agreement"]["same_order"] and data["agreement"]["spearman"] == pytest.approx(1.0)
    assert len(data["fast"]["map"]) == 16 and data["fast"]["passes"] == 9
    for name in ("reach_map", "reach_overlay"):
        with Image.open(data["files"][name]) as im:
            assert im.size[0] > 64
    assert "same order" in capsys.readouterr().out


def test_cli_influence_exact_cells_only(cli_files, tmp_path):
    out = tmp_path / "out"
    assert main(["influence", "--vae", str(cli_files["vae"]), "--latent", str(cli_files["latent"]), "--out",
                 str(out), "--window", "2", "--no-fast", "--cells", "3,3; 0,0"]) == 0
    data = strict_json(out / "influence.json")
    assert "fast" not in data and [(r["y"], r["x"]) for r in data["exact"]] == [(3, 3), (0, 0)]


@pytest.mark.parametrize("extra,needle", [
    (["--cells", "99,0"], "Invalid --cells: cell 99,0 is outside the 16x16 latent"),
    (["--cells", "1;2"], "Invalid --cells: cannot read '1;2' as y,x pairs"),
    (["--no-fast"], "Invalid --no-fast"), (["--window", "9"], "Invalid window"),
    (["--index", "3"], "Invalid --index"),
])
def test_cli_influence_bad_input_exits_2(cli_files, tmp_path, capsys, extra, needle):
    rc = main(["influence", "--vae", str(cli_files["vae"]), "--latent", str(cli_files["latent"]),
               "--out", str(tmp_path / "o"), *extra])
    assert rc == 2 and needle in capsys.readouterr().err


def test_cli_influence_help_and_usage_errors():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vae_fix", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    shown = run("influence", "--help")
    assert shown.returncode == 0 and "--exact-all" in shown.stdout
    assert run("influence", "--out", "x").returncode == 2  # --vae and a source are required
