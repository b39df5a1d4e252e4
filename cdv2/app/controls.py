"""The app's controls as data: label, range, default (the authors' app's) and the `Colorizer.colorize`
argument each one sets. No gradio here, so the table, its validation and the mapping to cdv2
arguments are testable without a browser; `cdv2.app.ui` lays the table out."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from cdv2.sample.seeds import MAX_APP_SEED as MAX_SEED  # the seed slider's maximum


@dataclasses.dataclass(frozen=True)
class Control:
    key: str                      # the settings key (also the gradio element id: "cdv2-<key>")
    label: str                    # the authors' label
    kind: str                     # "check" | "slider" | "choice" | "text"
    default: Any
    group: str                    # the panel it sits in
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: Sequence[str] = ()
    arg: Optional[str] = None     # the `Colorizer.colorize` keyword it sets (None: combined below)
    info: str = ""
    needs: Optional[str] = None   # the colorize keyword it needs when it sets none itself

    @property
    def requires(self) -> Optional[str]:
        return self.arg or self.needs


def _s(key, label, lo, hi, default, step, group, arg=None, info="", needs=None):
    return Control(key, label, "slider", default, group, lo, hi, step, arg=arg, info=info, needs=needs)


def _c(key, label, default, group, arg=None, info="", needs=None):
    return Control(key, label, "check", default, group, arg=arg, info=info, needs=needs)


# per-layer names of the authors' "accurate" panel (SD2.1 cross-attention layers, in order)
LAYER_NAMES = ("down0.attn0", "down0.attn1", "down1.attn0", "down1.attn1", "down2.attn0", "down2.attn1",
               "middle", "up2.attn0", "up2.attn1", "up2.attn2", "up1.attn0", "up1.attn1", "up1.attn2",
               "up0.attn0", "up0.attn1", "up0.attn2")


def build_controls(samplers: Sequence[str], schedules: Sequence[str], size_range=(512, 1536),
                   default_size: int = 512, default_sampler: str = "diffuser_dpm",
                   line_extractors: Sequence[str] = ("lineart_keras", "lineart", "lineart_denoise", "lineart_sk"),
                   mask_extractors: Sequence[str] = ("rmbg-v2", "isnet", "estimate"),
                   manipulation: bool = True) -> list[Control]:
    """The controls in the authors' layout. (Their "Disentangle scale" is omitted: v2 ignores it;
    their fp16/fp32 buttons are `cdv2 app --dtype`; "Save memory" has no JAX counterpart.)"""
    lo, hi = size_range
    controls = [
        _c("style_enhance", "Style enhance", False, "modes", "style_enhance"),
        _c("bg_enhance", "BG enhance (mask guided)", False, "modes", "background_enhance"),
        _c("fg_enhance", "FG enhance (mask guided)", False, "modes", "foreground_enhance"),
        _c("injection", "Attention injection", False, "modes", "attention_injection"),
        _s("reference_guidance", "Reference guidance scale", 1, 15, 4.0, 0.5, "guidance", "reference_guidance"),
        _s("reference_strength", "Reference strength", 0, 1, 1.0, 0.05, "guidance", "reference_strength"),
        _s("fg_strength", "Foreground strength", 0, 1, 1.0, 0.05, "guidance", "fg_strength"),
        _s("bg_strength", "Background strength", 0, 1, 1.0, 0.05, "guidance", "bg_strength"),
        _s("sketch_guidance", "Sketch guidance scale", 1, 5, 1.0, 0.1, "guidance", "sketch_guidance"),
        _s("sketch_strength", "Sketch strength", 0, 3, 1.0, 0.1, "guidance", "sketch_strength"),
        _s("background_factor", "Background factor", 0, 2, 1.0, 0.05, "guidance", "background_factor"),
        _s("merge_scale", "Merging scale", 0, 1, 0.0, 0.05, "guidance", "merge_scale"),
        _s("low_scale", "Semantics crossattn scale", 0, 1, 1.0, 0.05, "scales", "low_scale"),
        _s("middle_scale", "Color crossattn scale", 0, 1, 1.0, 0.05, "scales", "middle_scale"),
        _s("encoder_scale", "Encoder crossattn scale", 0, 1, 1.0, 0.05, "scales", "encoder_scale"),
        _c("crop", "Crop result", False, "advanced", "crop"),
        _c("remove_fg", "Remove foreground in background input", False, "advanced",
           "remove_foreground_in_background"),
        _c("rmbg", "Remove background in result", False, "advanced", "remove_background_in_result"),
        _s("injection_sketch_fidelity", "Injection fidelity (sketch)", 0, 2, 0.0, 0.05, "advanced",
           "injection_sketch_fidelity"),
        _s("injection_fidelity", "Injection fidelity (reference)", 0, 1, 0.5, 0.05, "advanced", "injection_fidelity"),
        _s("injection_start_step", "Injection start step", 0, 1, 0.0, 0.05, "advanced", "injection_start_step"),
        _s("guidance_start_step", "Guidance start step", 0, 1, 0.0, 0.05, "advanced", "guidance_start_step"),
        _s("guidance_end_step", "Guidance end step", 0, 1, 1.0, 0.05, "advanced", "guidance_end_step"),
        _s("no_guidance_start_step", "No guidance start step", -0.05, 1, -0.05, 0.05, "advanced",
           "no_guidance_start_step"),
        _s("no_guidance_end_step", "No guidance end step", -0.05, 1, -0.05, 0.05, "advanced", "no_guidance_end_step"),
        _c("authors_layer_mapping", "Authors' per-layer mapping", False, "accurate", "authors_layer_mapping",
           info="apply the per-layer scales exactly as the authors' app does (its off-by-one included)"),
        _c("accurate", "Activate accurate crossattn control", False, "accurate", needs="per_layer_scales"),
        *[_s(f"layer_{i}", f"{i}.{name}", 0, 1, 1.0, 0.05, "accurate", needs="per_layer_scales")
          for i, name in enumerate(LAYER_NAMES)],
        _s("reference_mask_threshold", "Reference mask threshold", 0, 1, 0.5, 0.01, "run", "reference_mask_threshold"),
        _s("sketch_mask_threshold", "Sketch mask threshold", 0, 1, 0.05, 0.01, "run", "sketch_mask_threshold"),
        _s("reference_padding_scale", "Reference padding scale", 1, 2, 1.0, 0.05, "run", "reference_padding_scale"),
        Control("line_extractor", "Line extractor", "choice", line_extractors[0], "run",
                choices=tuple(line_extractors), arg="line_extractor"),
        Control("mask_extractor", "Reference mask extractor", "choice", mask_extractors[0], "run",
                choices=tuple(mask_extractors), needs="sketch_preprocessor"),
        Control("sampler", "Sampler", "choice", default_sampler if default_sampler in samplers else samplers[0],
                "run", choices=tuple(samplers), arg="sampler"),
        Control("schedule", "Noise scheduler", "choice", schedules[0], "run", choices=tuple(schedules),
                arg="schedule"),
        Control("sketch_preprocessor", "Sketch preprocessor", "choice", "invert", "run",
                choices=("none", "extract", "invert", "invert-webui"), arg="sketch_preprocessor"),
        _s("num_images", "Batch size", 1, 8, 1, 1, "run", "num_images"),
        _s("width", "Width", lo, hi, default_size, 64, "run", needs="size"),
        _s("height", "Height", lo, hi, default_size, 64, "run", needs="size"),
        _s("steps", "Step", 1, 100, 20, 1, "run", "steps"),
        _s("seed", "Seed", -1, MAX_SEED, -1, 1, "run", info="-1 = random"),
        _c("deterministic_batch_seed", "Deterministic batch seed", False, "run", "deterministic_batch_seed"),
    ]
    if manipulation:
        controls += [
            Control("target_prompt", "Target prompt", "text", "", "manipulation", arg="target_prompt"),
            Control("anchor_prompt", "Anchor prompt", "text", "", "manipulation", arg="anchor_prompt"),
            Control("control_prompt", "Control prompt", "text", "", "manipulation", arg="control_prompt"),
            _s("target_scale", "Target scale", 0, 15, 0.0, 0.25, "manipulation", "target_scale"),
            *[_s(f"threshold_{i}", f"Threshold {i}", 0, 1, d, 0.01, "manipulation", needs="thresholds")
              for i, d in enumerate((0.5, 0.55, 0.65, 0.95))],
            _c("enhance_manipulation", "Enhance manipulation", False, "manipulation", "enhance_manipulation"),
            Control("prompt", "Final prompt", "text", "", "manipulation", arg="prompt",
                    info="one manipulation per line (the authors' syntax); the fields above add one"),
        ]
    return controls


def supported_by(controls: Sequence[Control], parameters) -> list[Control]:
    """The controls whose `Colorizer.colorize` keyword exists in `parameters` (so the UI offers
    exactly what the API does: nothing shown that would be ignored)."""
    return [c for c in controls if c.requires is None or c.requires in parameters]


def validate(controls: Sequence[Control], values: dict) -> list[str]:
    """Human-readable problems with `values` (empty when all are in range)."""
    problems = []
    for c in controls:
        if c.key not in values:
            problems.append(f"{c.label}: missing")
            continue
        v = values[c.key]
        if c.kind == "slider":
            try:
                v = float(v)
            except (TypeError, ValueError):
                problems.append(f"{c.label}: {v!r} is not a number")
                continue
            if not (c.minimum <= v <= c.maximum):
                problems.append(f"{c.label}: {v:g} is outside [{c.minimum:g}, {c.maximum:g}]")
        elif c.kind == "choice" and v not in c.choices:
            problems.append(f"{c.label}: {v!r} is not one of {', '.join(c.choices)}")
    return problems


def layer_scales(values: dict) -> Optional[list[float]]:
    """The 16 "accurate" per-layer cross-attention scales when that panel is active, else None
    (then the three grouped sliders apply)."""
    if not values["accurate"]:
        return None
    return [float(values[f"layer_{i}"]) for i in range(len(LAYER_NAMES))]


def to_colorize_kwargs(controls: Sequence[Control], values: dict, seed: int) -> dict:
    """`Colorizer.colorize` keyword arguments of validated `values` (the seed already resolved).
    The reference-mask extractor applies only when no reference-mask image was uploaded."""
    keys = {c.key for c in controls}
    kw = {c.arg: values[c.key] for c in controls if c.arg}
    for name in ("num_images", "steps"):
        kw[name] = int(kw[name])
    kw["size"] = (int(values["height"]), int(values["width"]))
    if "accurate" in keys:
        kw["per_layer_scales"] = layer_scales(values)
    kw["seed"] = seed
    if "mask_extractor" in keys:
        kw["reference_mask"] = values["mask_extractor"]
    if "threshold_0" in keys:
        kw["thresholds"] = tuple(float(values[f"threshold_{i}"]) for i in range(4))
    return kw
