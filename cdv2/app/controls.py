"""The app's controls as data: label, range, default (the authors' app's) and the `Colorizer.colorize`
argument each one sets. No gradio here, so the table, its validation and the mapping to cdv2
arguments are testable without a browser; `cdv2.app.ui` lays the table out."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

MAX_SEED = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class Control:
    key: str                      # the settings key (also the gradio element id: "cdv2-<key>")
    label: str                    # the authors' label
    kind: str                     # "check" | "slider" | "choice" | "int"
    default: Any
    group: str                    # the panel it sits in
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: Sequence[str] = ()
    arg: Optional[str] = None     # the `Colorizer.colorize` keyword it sets (None: combined below)
    info: str = ""


def _s(key, label, lo, hi, default, step, group, arg=None, info=""):
    return Control(key, label, "slider", default, group, lo, hi, step, arg=arg, info=info)


def _c(key, label, default, group, arg=None, info=""):
    return Control(key, label, "check", default, group, arg=arg, info=info)


# per-layer names of the authors' "accurate" panel (SD2.1 cross-attention layers, in order)
LAYER_NAMES = ("down0.attn0", "down0.attn1", "down1.attn0", "down1.attn1", "down2.attn0", "down2.attn1",
               "middle", "up2.attn0", "up2.attn1", "up2.attn2", "up1.attn0", "up1.attn1", "up1.attn2",
               "up0.attn0", "up0.attn1", "up0.attn2")


def build_controls(samplers: Sequence[str], schedules: Sequence[str], size_range=(512, 1536),
                   default_size: int = 512) -> list[Control]:
    lo, hi = size_range
    controls = [
        _c("style_enhance", "Style enhance", False, "modes", "style_enhance"),
        _c("bg_enhance", "BG enhance (mask guided)", False, "modes", "background_enhance"),
        _c("fg_enhance", "FG enhance (mask guided)", False, "modes", "foreground_enhance"),
        _s("reference_guidance", "Reference guidance scale", 1, 15, 4.0, 0.5, "guidance", "reference_guidance"),
        _s("reference_strength", "Reference strength", 0, 1, 1.0, 0.05, "guidance", "reference_strength"),
        _s("fg_strength", "Foreground strength", 0, 1, 1.0, 0.05, "guidance", "fg_strength"),
        _s("bg_strength", "Background strength", 0, 1, 1.0, 0.05, "guidance", "bg_strength"),
        _s("sketch_guidance", "Sketch guidance scale", 1, 5, 1.0, 0.1, "guidance", "sketch_guidance"),
        _s("sketch_strength", "Sketch strength", 0, 3, 1.0, 0.1, "guidance", "sketch_strength"),
        _s("background_factor", "Background factor", 0, 2, 1.0, 0.05, "guidance", "background_factor"),
        _s("merge_scale", "Merging scale", 0, 1, 0.0, 0.05, "guidance", "merge_scale"),
        _s("low_scale", "Semantics crossattn scale", 0, 1, 1.0, 0.05, "scales"),
        _s("middle_scale", "Color crossattn scale", 0, 1, 1.0, 0.05, "scales"),
        _s("encoder_scale", "Encoder crossattn scale", 0, 1, 1.0, 0.05, "scales"),
        _c("crop", "Crop result", False, "advanced", "crop"),
        _c("accurate", "Activate accurate crossattn control", False, "accurate"),
        *[_s(f"layer_{i}", f"{i}.{name}", 0, 1, 1.0, 0.05, "accurate") for i, name in enumerate(LAYER_NAMES)],
        _s("reference_mask_threshold", "Reference mask threshold", 0, 1, 0.5, 0.01, "run", "reference_mask_threshold"),
        _s("sketch_mask_threshold", "Sketch mask threshold", 0, 1, 0.05, 0.01, "run", "sketch_mask_threshold"),
        Control("sampler", "Sampler", "choice", samplers[0], "run", choices=tuple(samplers), arg="sampler"),
        Control("schedule", "Noise scheduler", "choice", schedules[0], "run", choices=tuple(schedules)),
        Control("sketch_polarity", "Sketch preprocessor", "choice", "auto", "run",
                choices=("auto", "black_on_white", "white_on_black"), arg="sketch_polarity",
                info="line polarity of the sketch (auto: detected)"),
        _s("num_images", "Batch size", 1, 8, 1, 1, "run", "num_images"),
        _s("width", "Width", lo, hi, default_size, 64, "run"),
        _s("height", "Height", lo, hi, default_size, 64, "run"),
        _s("steps", "Step", 1, 100, 20, 1, "run", "steps"),
        _s("seed", "Seed", -1, MAX_SEED, -1, 1, "run", info="-1 = random"),
    ]
    return controls


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


def mode_of(values: dict) -> str:
    """The cdv2 mode shorthand of the mode checkboxes."""
    style, bg = bool(values["style_enhance"]), bool(values["bg_enhance"])
    return {(False, False): "vanilla", (True, False): "style", (False, True): "background", (True, True): "full"}[
        (style, bg)]


def layer_scales(values: dict) -> Optional[list[float]]:
    """The 16 per-layer cross-attention scales: the accurate panel when active, else the three
    grouped sliders (encoder layers 0-5, middle 6, decoder 7-15), or None when all are 1."""
    if values["accurate"]:
        return [float(values[f"layer_{i}"]) for i in range(len(LAYER_NAMES))]
    enc, mid, low = float(values["encoder_scale"]), float(values["middle_scale"]), float(values["low_scale"])
    if enc == mid == low == 1.0:
        return None
    return [enc] * 6 + [mid] + [low] * 9


def resolve_seed(seed, rng) -> int:
    """-1 draws a random seed (from `rng`, a numpy Generator) so that it can be shown and reused."""
    seed = int(seed)
    return int(rng.integers(0, MAX_SEED)) if seed < 0 else seed


def to_colorize_kwargs(controls: Sequence[Control], values: dict, seed: int) -> dict:
    """`Colorizer.colorize` keyword arguments of validated `values` (the seed already resolved)."""
    kw = {c.arg: values[c.key] for c in controls if c.arg}
    for name in ("num_images", "steps"):
        kw[name] = int(kw[name])
    kw["mode"] = mode_of(values)
    for flag in ("style_enhance", "background_enhance"):
        kw.pop(flag, None)  # expressed by `mode`
    kw.pop("foreground_enhance", None)
    kw["size"] = (int(values["height"]), int(values["width"]))
    kw["per_layer_scales"] = layer_scales(values)
    kw["seed"] = seed
    if values.get("schedule") not in (None, "Automatic"):
        kw["karras"] = values["schedule"] == "Karras"
    return kw
