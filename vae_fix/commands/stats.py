"""`python -m vae_fix stats`: per-channel latent statistics, the scale/shift they imply, histograms
and latent → RGB previews.
"""
from __future__ import annotations

from ..errors import InputError
from ..images import save_png
from ._common import add_source_arguments, decoder_fn, latent_from_args, load_model, out_dir, write_json

NAME = "stats"
HELP = ("Per-channel statistics of latents (mean, std, min, max, percentiles), the scale factor and "
        "shift they imply next to the known families' values, histograms and latent-to-RGB previews.")


def add_arguments(p) -> None:
    add_source_arguments(p, vae_required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for stats.json, histogram.png and previews")
    p.add_argument("--family", default="auto",
                   help="latent family for the RGB preview: sd1, sdxl, sd3, flux, or auto (default: the only "
                        "family with this channel count; otherwise a map fitted with --vae)")
    p.add_argument("--bins", type=int, default=64, help="histogram bins (default 64)")


def run(args) -> int:
    from ..latent_preview import preview_for
    from ..stats import histogram_image, latent_stats

    if args.bins < 2:
        raise InputError("--bins", f"{args.bins}", "at least 2")
    out = out_dir(args.out)
    vae = load_model(args, need_decoder=False)
    z, _, _ = latent_from_args(args, vae, allow_nonfinite=True)  # counted, not refused
    stats = latent_stats(z)
    files = {"histogram": str(save_png(histogram_image(z, bins=args.bins), out / "histogram.png"))}
    decode = decoder_fn(vae) if vae is not None and vae.model.has_decoder else None
    try:
        prev = preview_for(z, args.family, decode if args.family == "auto" else None)
        for i in range(min(z.shape[0], 8)):
            files[f"preview_{i}"] = str(save_png(prev.image(z[i:i + 1], scale=8)[0], out / f"preview_{i}.png"))
        stats["preview"] = prev.to_dict()
    except InputError as e:
        if args.family != "auto":
            raise InputError("--family", e.problem, e.expected) from None
        stats["preview"] = {"skipped": str(e)}
    stats["source"] = {"latent": args.latent, "image": args.image, "vae": args.vae}
    stats["files"] = files
    write_json(stats, out / "stats.json")
    _print_summary(stats)
    print(f"wrote {out / 'stats.json'} and {len(files)} PNGs in {out}")
    return 0


def _print_summary(stats: dict) -> None:
    b, c, h, w = stats["shape"]
    print(f"latent {b}x{c}x{h}x{w}, {stats['values_per_channel']} values per channel")
    for ch in stats["channels"]:
        print(f"  ch {ch['channel']:2d}: mean {ch['mean']:9.4f}  std {ch['std']:9.4f}  "
              f"min {ch['min']:9.4f}  max {ch['max']:9.4f}")
    o = stats["overall"]
    print(f"implied scale 1/std = {o['implied_scale']:.5g}, shift = mean = {o['implied_shift']:.5g}"
          if o["implied_scale"] else "implied scale: undefined (zero spread)")
    for f in stats["families"]:
        if f["channels_match"]:
            print(f"  {f['label']}: scale {f['scale']}, shift {f['shift']}; this data in its model space: "
                  f"mean {f.get('model_space_mean', float('nan')):.3f}, std {f.get('model_space_std', float('nan')):.3f}")
    prev = stats.get("preview", {})
    if "skipped" in prev:
        print(f"preview skipped: {prev['skipped']}")
