"""Inference: image pre/post-processing, masks, the jitted pipeline and the `Colorizer` API
(the schedule, samplers and guidance live in `cdv2.diffusion`)."""
