"""Tooltip text shared by several nodes' schemas (one wording for one input wherever it appears)."""

COLORMAP_TIP = "Colour scale: viridis/magma/inferno are perceptually uniform (dark = low); gray for plain intensity."
SIZE_POLICY_TIP = ("What to do when the image size is not a multiple of the VAE's downscale (8 for SD): "
                   "'crop' keeps the centre (as core's VAE Encode does), 'pad' repeats the edge so every pixel is seen.")
MODE_TIP = ("How each cell is changed: 'median' replaces it by the median of its 8 neighbours (removes a spike: "
            "the question 'what does this cell carry that its neighbours do not'), 'zero' sets it to 0, "
            "'scale' multiplies it by 'factor'.")
FACTOR_TIP = "Only for mode 'scale': the cell is multiplied by this (e.g. 2 or 0.5; 1 changes nothing)."
WINDOW_TIP = ("Near field, in latent cells around the cell (3: a 7x7-cell box, 56 px for SD). Changes inside it "
              "are expected; the reach is what changes outside it.")
INDEX_TIP = ("Which latent of the batch to measure (0-based). A video latent [B, C, T, h, w]: which latent frame, "
             "counted item by item (item b, frame t is b x T + t); that frame is decoded alone.")
VAE_TIP = ("Any VAE ComfyUI loads (SD, SDXL, SD3, Flux, video VAEs...), in any dtype. It is not changed: the "
           "float32 redo runs on a copy, freed afterwards.")
REPORT_TIP = ("JSON: the dtype that gave the result, whether it was redone in float32, and per attempt how many "
              "values were non-finite and how long it took.")
