"""Reach of latent cells: the two measures (exact, fast map), the two features and their results,
and the reach-map / cell-reach commands."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from run_cli import run_cli, strict_json
from vae_fix.cli import main
from vae_fix.codec import model_codec
from vae_fix.errors import InputError
from vae_fix.latent_io import write_latent
from vae_fix.loader import save_vae
from vae_fix.model import AttnBlock, preset_config, random_vae
from vae_fix.reach import (cell_reach, exact_reach, fast_reach_map, neighbour_median, perturbation, reach_map,
                           reach_to_map, read_cells, summarize_map, top_cells)

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


def test_reach_map_shrinks_a_grid_that_does_not_fit_a_small_latent_and_says_so(sd_small):
    """The 8x8 latent of a 64 px image: the defaults (window 3, 3x3 regions) leave no far field, so
    the feature uses fewer regions and a smaller window, and its report and headline say so."""
    with torch.no_grad():
        result = reach_map(model_codec(sd_small), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    data = result.to_json()
    assert (data["window"], data["blocks"], data["fitted_from"]) == (1, 2, {"window": 3, "blocks": 3})
    assert data["backward_passes"] == 4 and data["latent_size"] == [8, 8]
    unmeasured = (~torch.isfinite(result.reach)).nonzero().tolist()
    assert unmeasured == [[3, 3], [3, 4], [4, 3], [4, 4]]  # their window touches all 4 regions: no far field
    assert all(tuple(c) not in {(3, 3), (3, 4), (4, 3), (4, 4)} for c in result.top_cells)
    assert "do not fit, used window 1, 2x2" in result.headline()
    assert "fitted_from" not in reach_map(model_codec(sd_small), torch.randn(1, 4, 16, 16), window=2).to_json()


def test_a_window_too_large_for_the_latent_shrinks_and_the_report_says_so(sd_small):
    """Window 9 on a 16x16 latent leaves nothing far: the fast map fits its grid, the exact measure
    its window (7), and both say what was asked; a single-cell latent is still refused."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    codec = model_codec(sd_small)
    with torch.no_grad():
        data = reach_map(codec, z, window=9).to_json()
    assert data["fitted_from"] == {"window": 9, "blocks": 3} and 2 * data["window"] + 1 < 16
    exact = cell_reach(codec, z, [(3, 3)], window=9).to_json()
    assert exact["window"] == 7 and exact["window_fitted_from"] == 9
    with pytest.raises(InputError, match=r"no far field on a 1x1 latent.*at least 2 cells"):
        exact_reach(local_plus_global, torch.zeros(1, 4, 1, 1), [(0, 0)], window=0)


def test_exact_bad_cells():
    with pytest.raises(InputError, match=r"cell \(16, 0\) is outside the 16x16 latent"):
        exact_reach(local_plus_global, torch.zeros(1, 4, 16, 16), [(16, 0)], window=2)
    with pytest.raises(InputError, match="not a \\(y, x\\) pair"):
        exact_reach(local_plus_global, torch.zeros(1, 4, 16, 16), ["a"], window=2)


# ---------------------------------------------------------------- the features and their results

SPIKE_TEXT = "3,3; 12,12; 3,12; 12,3; 8,8"


def counting(codec):
    """The codec with a counter of its plain decodes (calls and latents decoded)."""
    from dataclasses import replace
    seen = {"calls": 0, "latents": 0}

    def decode(z):
        seen["calls"] += 1
        seen["latents"] += z.shape[0]
        return codec.decode(z)
    return replace(codec, decode=decode), seen


def test_reach_map_result_is_what_the_node_reports(sd_small):
    with torch.inference_mode():
        result = reach_map(model_codec(sd_small), spiked_latent(), window=2, top=5)
    data = strict_json_text(result.json_text())
    assert [(c["y"], c["x"]) for c in data["top_cells"]] == [c for c, _ in SPIKES] == result.top_cells
    assert result.top_cells_text == SPIKE_TEXT
    assert data["backward_passes"] == 9 and data["latent_size"] == [16, 16] and data["downscale"] == 4
    assert data["mode"] == "median" and data["factor"] is None and data["window"] == 2 and data["blocks"] == 3
    assert data["max_over_median"] >= 10 and "map" not in data and data["method"].startswith("first-order")
    pictures = result.pictures()
    assert pictures["map"].shape[1] == 256 and pictures["map"].shape[2] > 256  # 64 px enlarged x4, colour bar
    assert tuple(pictures["overlay"].shape) == (3, 256, 256)
    lines = result.summary().splitlines()
    assert "strongest cell 3,3" in lines[0] and lines[1].startswith("  cell 3,3:") and "x the median" in lines[1]


def strict_json_text(text):
    import json
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_cell_reach_by_default_measures_the_reach_maps_top_cells(sd_small):
    seen = []
    codec, decodes = counting(model_codec(sd_small))
    result = cell_reach(codec, spiked_latent(), window=2, top=5, batch_size=8, progress=lambda d, t: seen.append((d, t)))
    data = strict_json_text(result.json_text())
    assert [(c["y"], c["x"]) for c in data["cells"]] == [c for c, _ in SPIKES]
    assert data["selection"] == "reach map top 5" and data["decodes"] == 6 == decodes["latents"]
    assert data["agreement"]["same_order"] and data["reach_map"]["backward_passes"] == 9
    assert seen[0] == (0, 14) and seen[-1] == (14, 14) and all(t == 14 for _, t in seen)
    assert "same order" in result.summary()


def test_cell_reach_difference_comes_from_its_own_decodes(sd_small):
    z = spiked_latent()
    codec, decodes = counting(model_codec(sd_small))
    result = cell_reach(codec, z, [(0, 0), (3, 3)], window=2)
    assert decodes == {"calls": 2, "latents": 3}  # the base image and one batch: no second decode for pictures
    assert [(r.y, r.x) for r in result.cells] == [(3, 3), (0, 0)] and result.selection == "given"
    changed = z.clone()
    changed[0, :, 3, 3] += perturbation(z)[0, :, 3, 3]
    shown = [sd_small.decode(t).clamp(-1, 1) for t in (changed, z)]
    torch.testing.assert_close(result.change, ((shown[0] - shown[1]).abs() / 2).mean(1)[0], atol=1e-5, rtol=1e-4)
    pictures = result.pictures()
    assert pictures["difference"].shape[1] == 256 and pictures["map"].shape[1] == 256
    grey = pictures["map"][:, 8 * 16 + 8, 8 * 16 + 8]  # cell (8, 8) (4 px cells, zoom 4): not measured
    assert torch.allclose(grey, torch.tensor([0.5, 0.5, 0.5]), atol=0.01)


def toy_codec():
    return model_codec_like(local_plus_global)


def model_codec_like(fn):
    from vae_fix.codec import Codec
    return Codec("toy", 4, 4, torch.device("cpu"), torch.float32, decode=fn, decode_grad=fn)


def test_cell_reach_of_every_cell_states_its_cost():
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    data = strict_json_text(cell_reach(toy_codec(), z, "all", window=1, batch_size=16).json_text())
    assert len(data["cells"]) == 144 and data["decodes"] == 145 and data["selection"] == "all"
    assert "agreement" not in data and "reach_map" not in data


def test_cells_as_text():
    assert read_cells("all") == read_cells(" ALL ") == "all"
    assert read_cells("") is None and read_cells("  ", empty="all") == "all"
    assert read_cells("9,21; 3,4") == [(9, 21), (3, 4)]
    with pytest.raises(InputError, match="Invalid top_cells: cannot read"):
        read_cells("9;", "top_cells")


@pytest.mark.parametrize("call,needle", [
    (lambda c, z: cell_reach(c, z, []), "Invalid cells: no cell given"),
    (lambda c, z: cell_reach(c, z, top=0), "Invalid top: 0"),
    (lambda c, z: reach_map(c, z, window=1, top=0), "Invalid top: 0"),
    (lambda c, z: reach_map(c, z, window=1, cmap="rainbow"), "Invalid cmap"),
    (lambda c, z: cell_reach(c, z, [(1, 1)], window=1, batch_size=0), "Invalid batch_size"),
])
def test_feature_bad_arguments(call, needle):
    with pytest.raises(InputError, match=needle):
        call(toy_codec(), torch.zeros(1, 4, 12, 12))


def test_a_vae_without_decoder_is_refused_by_name():
    from dataclasses import replace
    codec = replace(toy_codec(), decode=None, decode_grad=None, input_name="--vae")
    for call in (lambda: reach_map(codec, torch.zeros(1, 4, 12, 12), window=1),
                 lambda: cell_reach(codec, torch.zeros(1, 4, 12, 12), [(0, 0)], window=1)):
        with pytest.raises(InputError, match="Invalid --vae: it has no image decoder"):
            call()


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, sd_small):
    d = tmp_path_factory.mktemp("reach_cli")
    return {"vae": save_vae(sd_small, d / "sd_small.safetensors"),
            "latent": write_latent(spiked_latent(), d / "spiked.latent")}


def cli(command, files, out, *extra):
    return main([command, "--vae", str(files["vae"]), "--latent", str(files["latent"]), "--out", str(out),
                 "--window", "2", *extra])


def test_cli_reach_map_ranks_the_spikes(cli_files, tmp_path, capsys):
    assert cli("reach-map", cli_files, tmp_path / "out", "--top", "5") == 0
    data = strict_json(tmp_path / "out" / "reach_map.json")
    assert [[c["y"], c["x"]] for c in data["top_cells"]] == [list(c) for c, _ in SPIKES]
    assert len(data["map"]) == 16 and len(data["map"][0]) == 16 and data["backward_passes"] == 9
    for name in ("map", "overlay"):
        with Image.open(data["files"][name]) as im:
            assert im.size[0] > 64
    assert "strongest cell 3,3" in capsys.readouterr().out
    assert "strongest cell 3,3" in (tmp_path / "out" / "summary.txt").read_text()


def test_cli_cell_reach_measures_the_fast_maps_top_cells(cli_files, tmp_path, capsys):
    assert cli("cell-reach", cli_files, tmp_path / "out", "--exact", "5") == 0
    data = strict_json(tmp_path / "out" / "cell_reach.json")
    spikes = [list(c) for c, _ in SPIKES]
    assert [[r["y"], r["x"]] for r in data["cells"]] == spikes
    assert [[c["y"], c["x"]] for c in data["reach_map"]["top_cells"]] == spikes
    assert data["agreement"]["same_order"] and data["agreement"]["spearman"] == pytest.approx(1.0)
    for name in ("map", "difference"):
        with Image.open(data["files"][name]) as im:
            assert im.size[0] > 64
    assert "same order" in capsys.readouterr().out


def test_cli_cell_reach_given_cells_only(cli_files, tmp_path):
    assert cli("cell-reach", cli_files, tmp_path / "out", "--no-fast", "--cells", "3,3; 0,0") == 0
    data = strict_json(tmp_path / "out" / "cell_reach.json")
    assert "reach_map" not in data and [(r["y"], r["x"]) for r in data["cells"]] == [(3, 3), (0, 0)]
    assert data["decodes"] == 3 and data["selection"] == "given"


def test_cli_exact_all_is_cells_all():
    from vae_fix.cli import build_parser
    base = ["cell-reach", "--vae", "v", "--latent", "l", "--out", "o"]
    assert build_parser().parse_args([*base, "--exact-all"]).cells == "all"
    assert build_parser().parse_args([*base, "--cells", "all"]).cells == "all"


@pytest.mark.parametrize("command,extra,needle", [
    ("cell-reach", ["--cells", "99,0"], "Invalid --cells: cell (99, 0) is outside the 16x16 latent"),
    ("cell-reach", ["--cells", "1;2"], "Invalid --cells: cannot read '1;2' as y,x pairs"),
    ("cell-reach", ["--no-fast"], "Invalid --no-fast: nothing left to measure"),
    ("cell-reach", ["--top", "0"], "Invalid --top: 0"),
    ("cell-reach", ["--window", "-1"], "Invalid --window: -1"),
    ("reach-map", ["--window", "-1"], "Invalid --window: -1"),
    ("reach-map", ["--index", "3"], "Invalid --index: 3 is outside the batch of 1"),
    ("cell-reach", ["--index", "3"], "Invalid --index: 3 is outside the batch of 1"),
])
def test_cli_bad_input_exits_2_naming_it(cli_files, tmp_path, capsys, command, extra, needle):
    assert cli(command, cli_files, tmp_path / "o", *extra) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_cli_help_and_usage_errors():
    shown = run_cli("cell-reach", "--help")
    assert shown.returncode == 0 and "--exact-all" in shown.stdout and "--cells" in shown.stdout
    assert run_cli("reach-map", "--help").returncode == 0
    for command in ("reach-map", "cell-reach"):
        usage = run_cli(command, "--out", "x")
        assert usage.returncode == 2 and "required: --vae" in usage.stderr
        usage = run_cli(command, "--vae", "v.safetensors", "--out", "x")
        assert usage.returncode == 2 and "--image --latent is required" in usage.stderr
