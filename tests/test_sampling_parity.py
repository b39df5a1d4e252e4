"""Whole 8-step sampling runs against the oracle (the authors' `generate` on the tiny model):
conditions once, the jitted DPM++ loop, the VAE decode; and the no-recompile guarantee."""
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.sample.conditions import Inputs, Strengths
from cdv2.diffusion.guidance import branches_for
from cdv2.sample.pipeline import Guidance, Pipeline
from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err

# oracle run name -> (our mode, (reference guidance, sketch guidance)); settings.json
RUNS = {"vanilla": ("vanilla", (5.0, 1.0)), "style": ("style", (5.0, 1.0)),
        "background": ("background", (5.0, 1.0)), "full": ("full", (5.0, 1.0)),
        "full_dualcfg": ("full", (5.0, 2.0))}


@pytest.fixture(scope="module")
def pipe(tiny_config):
    return Pipeline(tiny_config)


def oracle_inputs(fx):
    return Inputs(sketch=jnp.asarray(nchw_to_nhwc(fx["sketch"])), reference=jnp.asarray(nchw_to_nhwc(fx["reference"])),
                  reference_ratios=jnp.ones((1, 2)), reference_mask=jnp.asarray(nchw_to_nhwc(fx["rmask"])),
                  sketch_mask=jnp.asarray(nchw_to_nhwc(fx["smask_latent"])))


@pytest.mark.parametrize("run", list(RUNS))
def test_full_sampling_matches_oracle(pipe, tiny_params, fixtures, run):
    mode, gs = RUNS[run]
    branches = branches_for(*gs)
    conds, _ = pipe.prepare(tiny_params, oracle_inputs(fixtures), Strengths(), mode=mode, branches=branches)
    # the conditions of the first U-Net call, exactly as the authors built them
    assert rel_err(conds.context, fixtures[f"{run}/cond_context_0"]) <= 1e-4
    for i in range(5):
        assert rel_err(nhwc_to_nchw(conds.control[i]), fixtures[f"{run}/cond_control_{i}"]) <= 1e-4
    for name, ours in (("hs_bg", conds.hs_bg), ("style_modulations", conds.style)):
        key = f"{run}/cond_{name}_0"
        assert (ours is None) == (key not in fixtures)
        if ours is not None:
            assert max(rel_err(o, fixtures[f"{run}/cond_{name}_{i}"]) for i, o in enumerate(ours)) <= 1e-4
    noise = jnp.asarray(nchw_to_nhwc(fixtures[f"{run}/x_noisy"][:1]))
    latent = pipe.denoise(tiny_params["unet"], conds, noise, Guidance(reference_guidance=gs[0], sketch_guidance=gs[1]),
                          sampler=("dpmpp_2m", 8, False), branches=branches)
    image = pipe.decode(tiny_params["vae"], latent)
    err_latent = rel_err(nhwc_to_nchw(latent), fixtures[f"{run}/final/latent"])
    err_image = rel_err(nhwc_to_nchw(image), fixtures[f"{run}/result"])
    print(f"{run}: final latent {err_latent:.2e}, decoded image {err_image:.2e}")
    assert err_latent <= 1e-3 and err_image <= 1e-3


def test_changing_scales_and_seed_does_not_recompile(pipe, tiny_params, fixtures):
    branches = branches_for(5.0, 2.0)
    conds, _ = pipe.prepare(tiny_params, oracle_inputs(fixtures), Strengths(), mode="full", branches=branches)
    before = dict(pipe.trace_counts)
    outs = []
    for k, (rg, sg, thr, seed) in enumerate([(5.0, 2.0, 0.05, 0), (7.5, 3.0, 0.2, 1), (2.0, 1.5, 0.5, 2)]):
        noise = jnp.asarray(np.random.RandomState(seed).randn(1, 16, 16, 4).astype(np.float32))
        g = Guidance(reference_guidance=rg, sketch_guidance=sg, sketch_mask_threshold=thr,
                     reference_scales=jnp.full((16,), 1.0 - 0.1 * k), fg_scale=1.0 - 0.2 * k, merge_scale=0.1 * k)
        outs.append(np.asarray(pipe.denoise(tiny_params["unet"], conds, noise, g, sampler=("dpmpp_2m", 3, False),
                                            branches=branches)))
        strengths = Strengths(control_scale=1.0 + 0.1 * k, mask_scale=1.0 - 0.1 * k, reference_mask_threshold=0.3 + 0.1 * k)
        pipe.prepare(tiny_params, oracle_inputs(fixtures), strengths, mode="full", branches=branches)
    after = dict(pipe.trace_counts)
    assert after["denoise"] - before["denoise"] <= 1  # at most the first call with 3 steps compiles
    assert after["prepare"] == before["prepare"]
    assert not np.allclose(outs[0], outs[1])  # the traced values really reach the computation


def _count_compiles():
    """A counter of XLA backend compiles (every jit/eager program JAX compiles in this process)."""
    import jax

    box = {"n": 0}

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            box["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    return box


def test_new_reference_or_background_size_compiles_nothing(tiny_params, tiny_config):
    """Reference/background images are resized on the host to fixed shapes, so after the first
    generation at a size, new image sizes compile NOTHING (style + background enhance, estimated
    masks, background image: every host and device path of `colorize`)."""
    from cdv2.sample.colorizer import Colorizer

    col = Colorizer(tiny_params, tiny_config)
    rng = np.random.RandomState(0)
    sketch = np.full((64, 128, 3), 255, np.uint8)
    sketch[16:48, 40:88] = 0
    sketch[20:44, 44:84] = 255  # a closed outline: the estimated sketch mask has an inside

    def image(h, w):
        x = np.full((h, w, 3), 250, np.uint8)  # plain background: the reference mask can be estimated
        x[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.randint(0, 255, (3,), np.uint8)
        return x

    counter = _count_compiles()
    table = []
    for use_bg in (False, True):
        for k, (h, w) in enumerate([(96, 80), (300, 200), (57, 131)]):
            row = []
            for run in range(2):
                before = counter["n"], dict(col.pipeline.trace_counts)
                col.colorize(sketch, image(h, w), background=image(w + 11, h + 5) if use_bg else None,
                             style_enhance=True, background_enhance=True, steps=2, size=(64, 128), seed=run,
                             sketch_polarity="black_on_white", reference_guidance=2.0, sketch_guidance=1.5)
                traced = {n: col.pipeline.trace_counts[n] - before[1][n] for n in before[1]}
                row.append(counter["n"] - before[0])
                if k or run:
                    assert row[-1] == 0 and not any(traced.values()), (h, w, run, row, traced)
            table.append(((h, w), use_bg, row))
    for hw, use_bg, row in table:
        print(f"reference {hw} {'+ background' if use_bg else ''}: XLA compiles per run {row}")
