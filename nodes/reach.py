"""Reach of latent cells: how much of the decoded image far away from a cell changes when that one
cell changes (the SD-VAE "smuggling" test).

Latent Reach Map: every cell at once, a first-order estimate from one decode and a few backward
passes through the host's own decoder. Latent Cell Reach: the exact measure for chosen cells, one
decode per cell. Units: change in 0..1 image units; near field = `window` cells around the cell.
A video latent is measured one latent frame at a time (`index` counts frames), each decoded alone.
"""

from comfy_api.v0_0_2 import io, ui

from ..vae_fix import reach, viz
from . import host, wire
from .tooltips import FACTOR_TIP, INDEX_TIP, MODE_TIP, WINDOW_TIP



class LatentReachMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentReachMap",
            display_name="Latent Reach Map",
            category="VAE Fix/reach",
            description=("For every latent cell at once: how much the decoded image changes far away from that cell "
                         "when the cell changes. A healthy decoder is local (small, even map); a cell that smuggles "
                         "global information stands out. Fast first-order estimate (one decode plus blocks x blocks "
                         "backward passes, whatever the size); check the top cells exactly with Latent Cell Reach."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is tested (KL VAEs of any family, or TAESD)."),
                io.Latent.Input("latent", tooltip="The latent to test, e.g. from VAE Encode or a sampler; image or "
                                                  "video [B, C, T, h, w]."),
                io.Combo.Input("mode", options=list(reach.MODES), default="median", tooltip=MODE_TIP),
                io.Float.Input("factor", default=2.0, min=-100.0, max=100.0, step=0.1, tooltip=FACTOR_TIP),
                io.Int.Input("window", default=3, min=0, max=64, tooltip=WINDOW_TIP),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TIP),
                io.Int.Input("blocks", default=3, min=2, max=16,
                             tooltip="The far field is measured as the mean colour of blocks x blocks regions: one backward "
                                     "pass each. More regions see finer far changes but need a smaller window "
                                     "(blocks x (2 x window + 1) cells must fit the latent)."),
                io.Int.Input("top", default=5, min=1, max=64, tooltip="How many of the strongest cells to box and list."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="inferno",
                               tooltip="Colour scale of the map (dark = no reach)."),
            ],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="The reach of every cell (RMS change of the far field, 0..1 units), one block per latent "
                                        "cell so it lines up with the decoded image (small ones enlarged)."),
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="The decoded latent with the map blended over it and the top cells boxed."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON: the top cells with their values, the median, how far the worst stands above "
                                         "it (max_over_median), and the settings."),
                io.String.Output("top_cells", display_name="top_cells",
                                 tooltip="The top cells as 'y,x; y,x' text: connect it to Latent Cell Reach's 'top_cells' to "
                                         "measure them exactly."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent, mode, factor, window, index, blocks, top, colormap) -> io.NodeOutput:
        result = reach.reach_map(host.codec(vae), wire.latent_samples(latent, video=True), mode=mode, factor=factor, window=window,
                                 blocks=blocks, top=top, index=index, cmap=colormap, progress=host.progress_fn())
        pictures = wire.pictures(result)
        return io.NodeOutput(pictures["map"], pictures["overlay"], result.json_text(), result.top_cells_text,
                             ui=ui.PreviewImage(pictures["map"], cls=cls))


class LatentCellReach(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VAEFixLatentCellReach",
            display_name="Latent Cell Reach (exact)",
            category="VAE Fix/reach",
            description=("Changes chosen latent cells one at a time, decodes each change and measures how much of the "
                         "image changes outside the cell's near window, against inside it. Exact, one decode per cell: "
                         "use it on the few cells Latent Reach Map points at (or on every cell of a small latent)."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is tested (KL VAEs of any family, or TAESD)."),
                io.Latent.Input("latent", tooltip="The latent to test, e.g. from VAE Encode or a sampler; image or "
                                                  "video [B, C, T, h, w]."),
                io.String.Input("cells", default="",
                                tooltip="Cells to measure: '9,21' or '9,21; 3,4' (y,x latent cells, 0-based); empty: the "
                                        "reach map's 8 strongest cells; 'all': every cell (one decode each: 1,025 for a "
                                        "512 px SD image; the cost is shown on the node before it starts, and Cancel "
                                        "stops it)."),
                io.Combo.Input("mode", options=list(reach.MODES), default="median", tooltip=MODE_TIP),
                io.Float.Input("factor", default=2.0, min=-100.0, max=100.0, step=0.1, tooltip=FACTOR_TIP),
                io.Int.Input("window", default=3, min=0, max=64, tooltip=WINDOW_TIP),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TIP),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Changed latents decoded together: more is faster, needs more memory."),
                io.Combo.Input("colormap", options=list(viz.CMAPS), default="inferno",
                               tooltip="Colour scale of the pictures (dark = no change)."),
                io.String.Input("top_cells", optional=True, force_input=True,
                                tooltip="Optional: connect Latent Reach Map's top_cells here to measure those cells; "
                                        "when connected, 'cells' is ignored."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Image.Output("map", display_name="map",
                                tooltip="Mean far change of each measured cell on the latent grid (grey: not measured)."),
                io.Image.Output("difference", display_name="difference",
                                tooltip="For the cell with the largest far change: |change| of every pixel of the decoded "
                                        "picture (as VAE Decode shows it, 0..1) when only that cell changes; the cell boxed."),
                io.String.Output("report", display_name="report",
                                 tooltip="JSON per cell: mean change far and near (0..1 units), their ratio, the largest and "
                                         "the RMS far change, the far regions' mean-colour change (what the reach map "
                                         "estimates); sorted by mean far change, largest first."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent, cells, mode, factor, window, index, batch_size, colormap,
                top_cells=None) -> io.NodeOutput:
        chosen = (reach.read_cells(cells, "cells") if top_cells is None  # blank: the reach map's top cells
                  else reach.read_cells(top_cells, "top_cells"))
        z = wire.latent_samples(latent, video=True)
        host.show_text(cls.hidden.unique_id, "measuring " + reach.cost_text(z, chosen))
        result = reach.cell_reach(host.codec(vae), z, chosen, mode=mode, factor=factor,
                                  window=window, index=index, batch_size=batch_size, cmap=colormap,
                                  progress=host.progress_fn())
        pictures = wire.pictures(result)
        return io.NodeOutput(pictures["map"], pictures["difference"], result.json_text(),
                             ui=ui.PreviewImage(pictures["map"], cls=cls))


NODES = [LatentReachMap, LatentCellReach]
