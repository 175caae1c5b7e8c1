"""What a training run measures at its evaluation points, with the engine's own tools.

Held-out photographs (never trained on) give reconstruction PSNR at 128 and 256 px, the posterior's
log-variance (median, lowest, clamp-floor hits), the KL per latent element and the implied scale
factor (1 / std of the latent means, as SD's 0.18215 is). The Health Check's probe images give the
verdict and the anomaly depth, and the fast reach map of every held-out photo gives the worst
cell's far reach over the median cell's (`reach`: the first photo's, as the study first measured;
`reach_photos`: each photo's, since one photo proved too few to rank models by). Nothing here trains: the model is evaluated as the host would
run it (posterior mean, no sampling).
"""
from __future__ import annotations

import math

import torch

from .anomaly import LOGVAR_MIN
from .codec import model_codec
from .inspect import inspect_vae
from .probes import probe_images
from .reach_measure import fast_reach_map, summarize_map
from .train_data import centre_square

EVAL_SIZES = (128, 256)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in 0..1."""
    mse = float((a - b).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(model, image01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[1, 3, S, S]` reconstruction in 0..1, moments `[1, 2C, s, s]`) of a 0..1 image."""
    p = next(model.parameters())
    m = model.moments(image01.to(p.device, p.dtype) * 2 - 1).float()
    c = model.config.latent_channels
    rec = model.decode(m[:, :c].to(p.dtype)).float().clamp(-1, 1).add(1).div(2)
    return rec.cpu(), m.cpu()


def held_out_metrics(model, held: list[torch.Tensor], names: list[str], sizes=EVAL_SIZES) -> dict:
    """PSNR per image and size, and the posterior's numbers at the largest size."""
    out = {"psnr": {}, "images": list(names)}
    means, logvars = [], []
    for size in sizes:
        scores = {}
        for img, name in zip(held, names):
            x = centre_square(img, size)
            rec, m = reconstruct(model, x)
            scores[name] = psnr(rec, x)
            if size == max(sizes):
                c = model.config.latent_channels
                means.append(m[:, :c].flatten())
                logvars.append(m[:, c:].flatten())
        out["psnr"][str(size)] = {"mean": sum(scores.values()) / max(len(scores), 1), "per_image": scores}
    if means:
        mu, lv = torch.cat(means), torch.cat(logvars)
        kl = 0.5 * (mu.pow(2) + lv.clamp(LOGVAR_MIN, 20).exp() - 1 - lv.clamp(LOGVAR_MIN, 20))
        out.update(logvar_median=float(lv.median()), logvar_min=float(lv.min()),
                   logvar_p01=float(lv.quantile(0.01)) if lv.numel() <= 2 ** 24 else None,
                   clamp_floor_hits=int((lv <= LOGVAR_MIN).sum()), kl_per_element=float(kl.mean()),
                   latent_std=float(mu.std()), implied_scale_factor=1.0 / max(float(mu.std()), 1e-12))
    return out


def verdict_metrics(model, probe_size: int = 128) -> dict:
    """The Health Check on the built-in probes: verdict, the deepest anomaly, clamp-floor hits."""
    images, names = probe_images((probe_size,))
    result = inspect_vae(model_codec(model, "training"), images, names=names, check_reach=True)
    v = result.verdict
    depths = [a for rep in result.found for a in rep.anomalies]
    deepest = min(depths, key=lambda a: a.logvar_raw_min, default=None)
    return {"status": v.status, "black_hole": v.black_hole, "line": v.line(),
            "images_with_collapse": v.images_with_collapse, "images": v.images,
            "deepest": None if deepest is None else {"y": deepest.y, "x": deepest.x, "drop": deepest.drop,
                                                     "score": deepest.score, "logvar": deepest.logvar_raw_min},
            "floor_hit_cells": sum(len(rep.floor_hits) for rep in result.found),
            "typical_logvar": result.found[0].baseline.get("median") if result.found else None,
            "reach": v.reach}


def model_reach_map(model, image01: torch.Tensor) -> torch.Tensor:
    """`[h, w]` fast reach map of `model` on the posterior mean of `image01` `[1, 3, S, S]` in 0..1."""
    p = next(model.parameters())
    with torch.no_grad():
        z = model.encode(image01.to(p.device, p.dtype) * 2 - 1)

    def decode(latent):
        return model.decode(latent.to(p.dtype)).float()

    return fast_reach_map(decode, z.float()).reach


def reach_metrics(model, image: torch.Tensor, size: int = 256) -> dict:
    """Fast reach map of one held-out photo: the worst cell's far reach over the median cell's."""
    summary = summarize_map(model_reach_map(model, centre_square(image, size)))
    return {"worst_over_median": summary["max_over_median"], "worst_cell": summary["top_cells"][0]}


def evaluate(model, held: list[torch.Tensor], names: list[str], reach_size: int = 256) -> dict:
    """Every number the study tracks, the model left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        record = held_out_metrics(model, held, names)
        record["verdict"] = verdict_metrics(model)
        reach = [reach_metrics(model, image, reach_size) for image in held]
        record["reach"] = reach[0] if reach else None
        record["reach_photos"] = {name: r["worst_over_median"] for name, r in zip(names, reach)}
    finally:
        model.train(was_training)
    return record
