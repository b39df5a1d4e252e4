"""The app's control table without a browser: defaults equal the authors' app, out-of-range values
are refused with the control's label, and values map onto `Colorizer.colorize` arguments."""
import numpy as np
import pytest

from cdv2.app import controls as ctl
from cdv2.sample.seeds import MAX_APP_SEED, resolve_seed


def _controls():
    return ctl.build_controls(("diffuser_dpm", "Euler a"), ("Automatic", "Karras"))


def _defaults(controls):
    return {c.key: c.default for c in controls}


def test_defaults_are_the_authors_and_valid():
    controls = _controls()
    values = _defaults(controls)
    assert ctl.validate(controls, values) == []
    # the authors' app: every mode off, reference guidance 4, 20 steps, 512 x 512, seed -1,
    # diffuser_dpm, sketch preprocessor "invert", rmbg-v2 masks, injection fidelity 0.5
    assert not any(values[k] for k in ("style_enhance", "bg_enhance", "fg_enhance", "injection"))
    assert (values["reference_guidance"], values["steps"], values["width"], values["seed"]) == (4.0, 20, 512, -1)
    assert (values["sketch_preprocessor"], values["mask_extractor"], values["injection_fidelity"]) == (
        "invert", "rmbg-v2", 0.5)
    assert len([c for c in controls if c.key.startswith("layer_")]) == 16


def test_out_of_range_and_unknown_values_are_named():
    controls = _controls()
    values = dict(_defaults(controls), reference_guidance=20.0, sampler="nope", steps="abc")
    problems = ctl.validate(controls, values)
    assert any(p.startswith("Reference guidance scale: 20") for p in problems)
    assert any(p.startswith("Sampler: 'nope'") for p in problems)
    assert any(p.startswith("Step: 'abc'") for p in problems)


def test_mapping_to_colorize_arguments():
    controls = _controls()
    values = dict(_defaults(controls), style_enhance=True, bg_enhance=True, encoder_scale=0.5, seed=3,
                  width=640, height=512, num_images=2.0, threshold_2=0.7)
    kw = ctl.to_colorize_kwargs(controls, values, seed=3)
    assert kw["style_enhance"] and kw["background_enhance"] and not kw["foreground_enhance"]
    assert kw["size"] == (512, 640) and kw["num_images"] == 2 and kw["seed"] == 3
    assert kw["encoder_scale"] == 0.5 and kw["per_layer_scales"] is None
    assert kw["reference_mask"] == "rmbg-v2" and kw["thresholds"] == (0.5, 0.55, 0.7, 0.95)
    values = dict(values, accurate=True, layer_6=0.25)
    assert ctl.layer_scales(values)[6] == 0.25 and ctl.layer_scales(values)[0] == 1.0


def test_only_controls_the_api_accepts_are_offered():
    controls = _controls()
    offered = ctl.supported_by(controls, {"reference_guidance", "steps", "size", "seed"})
    assert {c.key for c in offered} == {"reference_guidance", "steps", "width", "height", "seed"}


def test_seed_minus_one_draws_a_reusable_seed():
    rng = np.random.default_rng(0)
    seeds = {resolve_seed(-1, rng) for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s <= MAX_APP_SEED for s in seeds)
    assert resolve_seed(42, rng) == 42
    assert len({resolve_seed(-1) for _ in range(5)}) == 5  # without a Generator: Python's random
    with pytest.raises(ValueError, match="seed must be"):
        resolve_seed(-2)
