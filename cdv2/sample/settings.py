"""The app's numeric controls -> the Pipeline's traced settings (`Strengths` for `prepare`,
`Guidance` for the denoiser) and the CFG branches they need: one mapping, used by
`Colorizer.colorize` and `cdv2.sample.batch`. Keywords and defaults are the authors' app's."""
from __future__ import annotations

from typing import Optional, Sequence

from cdv2.diffusion.guidance import branches_for
from cdv2.sample.conditions import Strengths
from cdv2.sample.pipeline import Guidance
from cdv2.sample.scales import reference_scales


def pipeline_settings(*, reference_guidance: float = 4.0, sketch_guidance: float = 1.0,
                      reference_strength: float = 1.0, encoder_scale: float = 1.0, middle_scale: float = 1.0,
                      low_scale: float = 1.0, per_layer_scales: Optional[Sequence[float]] = None,
                      authors_layer_mapping: bool = False, fg_strength: float = 1.0, bg_strength: float = 1.0,
                      merge_scale: float = 0.0, sketch_strength: float = 1.0, background_factor: float = 1.0,
                      sketch_mask_threshold: float = 0.05, reference_mask_threshold: float = 0.5,
                      guidance_start_step: float = 0.0, guidance_end_step: float = 1.0,
                      no_guidance_start_step: float = -0.05, no_guidance_end_step: float = -0.05,
                      injection_fidelity: float = 0.5, injection_sketch_fidelity: float = 0.0,
                      injection_start_step: float = 0.0) -> tuple[Strengths, Guidance, tuple[str, ...]]:
    """-> (strengths, guidance, branches). See `Colorizer.colorize` for what each control does."""
    strengths = Strengths(control_scale=sketch_strength, mask_scale=background_factor, merge_scale=merge_scale,
                          reference_mask_threshold=reference_mask_threshold,
                          injection_sketch_fidelity=injection_sketch_fidelity)
    scales = reference_scales(reference_strength, encoder_scale=encoder_scale, middle_scale=middle_scale,
                              low_scale=low_scale, per_layer=per_layer_scales,
                              authors_layer_mapping=authors_layer_mapping)
    guidance = Guidance(reference_guidance=reference_guidance, sketch_guidance=sketch_guidance,
                        sketch_mask_threshold=sketch_mask_threshold, reference_scales=scales,
                        fg_scale=fg_strength, bg_scale=bg_strength, merge_scale=merge_scale,
                        guidance_start=guidance_start_step, guidance_end=guidance_end_step,
                        no_guidance_start=no_guidance_start_step, no_guidance_end=no_guidance_end_step,
                        injection_fidelity=injection_fidelity, injection_start_step=injection_start_step)
    return strengths, guidance, branches_for(reference_guidance, sketch_guidance)
