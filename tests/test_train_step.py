"""The training core on the tiny model (the oracle's random weights: every weight non-zero, so every
trainable leaf gets a gradient): stage trainable sets, frozen leaves bitwise untouched and without
optimizer state, the objective's formulas against numpy, overfitting, gradient accumulation vs one
big batch, and bf16 compute vs fp32. XLA's fast-compile options keep the compiles short."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from cdv2.config import load_model_config
from cdv2.model import GROUPS, param_shapes
from cdv2.modules.unet import input_layout, output_layout
from cdv2.diffusion.schedule import ldm_alphas_cumprod
from cdv2.train.config import load_train_config
from cdv2.train.objective import draw_noise, noisy_latent_and_target, sample_rngs, training_size_ratios, v_mse
from cdv2.train.stages import is_trainable, make_optimizer
from cdv2.train.step import build_components, create_train_state, make_train_step
from mesh_worker import FAST_COMPILE, make_batch

B, S = 4, 64


def _cfg(stage: int, **overrides):
    base = {"model": "tiny", "batch_size": B, "compute_dtype": "float32", "optim.lr": 1e-3}  # lr 100x the authors'
    return load_train_config(f"stage{stage}", dict(base, **overrides))


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _host(tree) -> dict:
    """Copies (not views: the step donates its input buffers)."""
    return {k: np.array(v, copy=True) for k, v in _flat(tree).items()}


@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def params(tiny_params):
    return jax.tree.map(jnp.asarray, tiny_params)


def _run_steps(cfg, model_cfg, params, batches, compute_dtype=None):
    comps = build_components(cfg, model_cfg)
    opt = make_optimizer(cfg.optim, cfg.stage)
    state = create_train_state(params, opt, cfg.seed)
    before = _host(state.params)
    step = make_train_step(cfg, comps, opt, compiler_options=FAST_COMPILE)
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append({k: float(v) for k, v in m.items()})
    return before, state, metrics, step, opt


# Stage 1 runs from cached latents/tokens (the VAE/CLIP path runs live in the stage-2/3 tests), with
# AdamW in its linear regime: eps >> |g| makes the update lr/eps * g = 0.1 g (an SGD step), so the
# parameter change measures the gradient itself (a tiny eps would make the first update lr*sign(g)).
# One compiled step then serves the stage-1 invariants, overfitting, the big-batch side of the
# accumulation test and the fp32 side of the bf16 test.
STAGE1 = {"inpaint_p": 0.0, "optim.lr": 10.0, "optim.eps": 100.0, "optim.weight_decay": 0.0}


@pytest.fixture(scope="module")
def stage1_run(model_cfg, params):
    cfg = _cfg(1, **STAGE1)
    return cfg, _run_steps(cfg, model_cfg, params, [make_batch(B, S, cached=True)])


def no_gradient_by_construction(model_cfg, image_size: int) -> set:
    """Trainable leaves that get an exactly zero gradient in this tiny setting, and why:
    * attention with ONE key token (a 1x1 level at 64 px: the middle block, the warp modules of
      output blocks 0-2) has a constant softmax, so its q/k (and the LayerNorm feeding only q) are dead;
    * warp modules narrower than 64 channels have 0 heads of 64 (the authors' SelfTransformerBlock),
      so their attention is to_out's bias: norm1 and the bg-encoder tokens they would read are dead.
    The full-size model has neither (12x12 lowest level at 768 px, >= 320 channels)."""
    ucfg = model_cfg.unet
    size, sizes = image_size // 8, []
    for blk in input_layout(ucfg):
        size = (size + 1) // 2 if blk.kind == "down" else size
        sizes.append(size)
    dead = set()
    if sizes[-1] == 1:
        dead |= {f"unet/middle_block_1/transformer_blocks_0/attn1/to_{p}/kernel" for p in "qk"}
    for blk, skip_size in zip(output_layout(ucfg), sizes[::-1]):
        warp = f"unet/warp_modules_{blk.index}"
        if blk.skip_channels // 64 == 0:
            dead |= {f"{warp}/norm1/scale", f"{warp}/norm1/bias"}
            dead |= {f"bg_encoder/zero_layers_{11 - blk.index}/{p}" for p in ("kernel", "bias")}
        elif skip_size == 1:
            dead |= {f"{warp}/norm1/scale", f"{warp}/norm1/bias", f"{warp}/attn/to_q/kernel",
                     f"{warp}/attn/to_k/kernel"}
    return dead


def _check_stage_step(stage, before, state, metrics, dead: set, every_leaf_moves=True):
    """Frozen leaves bitwise unchanged; every trainable leaf got a non-zero gradient (non-zero Adam
    first moment) except exactly the `dead` ones explained by the tiny setting, and moved (AdamW's
    decay moves even those; with `every_leaf_moves=False`, the linear-regime optimizer of STAGE1 with
    no decay, a gradient far below a weight's fp32 spacing cannot move it, so 90% must); Adam
    moments exist for exactly the trainable leaves."""
    after = _host(state.params)
    assert set(after) == set(before)
    trainable = {k for k in before if is_trainable(k, stage)}
    assert trainable and len(trainable) < len(before)
    for k, b in before.items():
        a = after[k]
        if k in trainable:
            assert np.all(np.isfinite(a)), k
        else:
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"frozen {k} changed"
    nonempty = {k for k in trainable if before[k].size}
    moved = {k for k in nonempty if not np.array_equal(after[k], before[k])}
    if every_leaf_moves:
        assert moved == nonempty, sorted(nonempty - moved)[:5]
    else:
        assert len(moved) >= 0.9 * len(nonempty), (len(moved), len(nonempty))

    # optimizer state: Adam moments exist exactly for the trainable leaves, nothing for frozen ones
    for name in ("mu", "nu"):
        moments = {k: v for k, v in _flat(optax.tree_utils.tree_get(state.opt_state, name)).items()
                   if isinstance(v, jax.Array)}       # frozen leaves hold an empty MaskedNode
        assert set(moments) == trainable, (len(moments), len(trainable))
        if name == "mu":
            no_grad = {k for k in nonempty if not np.any(np.asarray(moments[k]))}
            assert no_grad == dead & trainable, (sorted(no_grad - dead)[:5], sorted((dead & trainable) - no_grad)[:5])
    array_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(array_leaves) == 2 * len(trainable)
    assert sum(x.size for x in array_leaves) == 2 * sum(before[k].size for k in trainable)
    m = metrics[0]
    assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["grad_norm"] > 0


def test_stage_trainable_sets(model_cfg):
    paths = list(_flat(param_shapes(model_cfg)))
    by_stage = {s: {p for p in paths if is_trainable(p, s)} for s in (1, 2, 3)}
    lora = {p for p in paths if "/lora_" in p}
    assert len(lora) == 9 * 3 * 4 and all(p.split("/")[1].startswith("output_blocks_") for p in lora)
    assert lora <= by_stage[2] and not lora & (by_stage[1] | by_stage[3])
    assert {p for p in paths if p.startswith("unet/warp_modules_")} <= by_stage[2]
    assert {p for p in paths if p.startswith("unet/style_modules_")} <= by_stage[3]
    assert {p for p in paths if p.startswith("sketch_encoder/")} <= by_stage[1]
    assert {p for p in paths if p.startswith("bg_encoder/")} <= by_stage[2]
    assert {p for p in paths if p.startswith("style_encoder/")} <= by_stage[3]
    # the stages are disjoint and cover every leaf except CLIP and the VAE
    assert not (by_stage[1] & by_stage[2] or by_stage[1] & by_stage[3] or by_stage[2] & by_stage[3])
    never = set(paths) - by_stage[1] - by_stage[2] - by_stage[3]
    assert never == {p for p in paths if p.split("/")[0] in ("clip", "vae")}
    assert set(GROUPS) == {p.split("/")[0] for p in paths}


def test_stage1_step(stage1_run, model_cfg):
    cfg, (before, state, metrics, _, _) = stage1_run
    _check_stage_step(1, before, state, metrics, no_gradient_by_construction(model_cfg, S), every_leaf_moves=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_stage_step(stage, model_cfg, params):
    cfg = _cfg(stage)
    # stage 3: two steps; with seed 0 the per-step coin gives the plain path, then the background
    # path, so both lax.cond branches run (the style encoder and modules have no dead paths)
    n = 1 if stage == 2 else 2
    before, state, metrics, _, _ = _run_steps(cfg, model_cfg, params, [make_batch(B, S)] * n)
    assert [m["bg_path"] for m in metrics] == ([1.0] if stage == 2 else [0.0, 1.0])
    _check_stage_step(stage, before, state, metrics, no_gradient_by_construction(model_cfg, S))
    print(f"stage {stage}: {metrics}")


def test_objective_formulas_match_numpy():
    key = jax.random.PRNGKey(3)
    shape = (B, 8, 8, 4)
    t, eps, n_bc = draw_noise(sample_rngs(key, 0, B, key), shape)
    t, eps, n_bc = np.asarray(t), np.asarray(eps, np.float64), np.asarray(n_bc, np.float64)
    assert t.shape == (B,) and t.min() >= 0 and t.max() < 1000 and n_bc.shape == (B, 1, 1, 4)
    x0 = np.random.default_rng(0).normal(size=shape)

    # independent schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 in float64
    ac = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    a = ac[t].reshape(-1, 1, 1, 1)
    noise = eps + 0.05 * n_bc
    want_xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    want_v = np.sqrt(a) * noise - np.sqrt(1 - a) * x0

    alpha = jnp.asarray(ldm_alphas_cumprod())[t].reshape(-1, 1, 1, 1)
    x_t, v = noisy_latent_and_target(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32),
                                     jnp.asarray(n_bc, jnp.float32), alpha, 0.05)
    np.testing.assert_allclose(np.asarray(x_t), want_xt, atol=2e-6)
    np.testing.assert_allclose(np.asarray(v), want_v, atol=2e-6)
    assert abs(float(v_mse(x_t, v)) - np.mean((want_xt - want_v) ** 2)) < 1e-5

    # a sample's draws depend only on its global index: micro-batch [2:4] == big batch rows 2:4
    t2, eps2, n2 = draw_noise(sample_rngs(key, 2, 2, key), (2,) + shape[1:])
    np.testing.assert_array_equal(np.asarray(t2), t[2:])
    np.testing.assert_array_equal(np.asarray(eps2), eps[2:].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(n2), n_bc[2:].astype(np.float32))


def _reference_size_ratios(source_hw, target_hw):
    """The authors' `get_size_embedding` ratios written out in plain Python (independent reference):
    a source smaller than the target has its height grown by max(H, W), aspect kept."""
    oh, ow = source_hw
    h, w = target_hw
    ih, iw = (oh + max(h, w), ow / oh * (oh + max(h, w))) if (oh < h or ow < w) else (oh, ow)
    return np.array([ih / h, iw / w], np.float32)


def test_size_ratios_match_inference_formula():
    sizes = np.array([[1024, 768], [100, 200], [768, 768], [500, 2000]], np.float32)
    got = np.asarray(training_size_ratios(sizes, (768, 768)))
    want = np.stack([_reference_size_ratios(tuple(s), (768, 768)) for s in sizes])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_loss_falls_when_overfitting(stage1_run, model_cfg, params):
    cfg, (_, _, _, step, opt) = stage1_run          # reuse the compiled stage-1 step
    batch = make_batch(B, S, cached=True)
    state = create_train_state(params, opt, cfg.seed)
    losses = []
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    t0 = time.time()
    for _ in range(29):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    per_s = 29 / (time.time() - t0)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    blocks = [np.mean(losses[i:i + 10]) for i in (0, 10, 20)]
    print(f"overfit: first-5 mean {first:.4f}, last-5 mean {last:.4f}, 10-step means {np.round(blocks, 4)}, "
          f"{per_s:.2f} steps/s with fast-compile XLA (B={B}, {S}px, cached latents)")
    # t and the noise are redrawn every step, so single losses are noisy: compare block means. A
    # predictor that ignores its inputs scores ~1.0 (E[v^2] for unit-variance latents and noise).
    assert blocks[0] > blocks[1] > blocks[2], losses
    assert last < 0.75 * first and np.mean(losses[-10:]) < 0.9, losses


def test_grad_accumulation_equals_big_batch(stage1_run, model_cfg, params):
    cfg_big, (before, s_big, m_big, _, _) = stage1_run      # one step on the batch of 4
    big = make_batch(B, S, cached=True)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    cfg_acc = _cfg(1, batch_size=2, **{"optim.grad_accum_steps": 2}, **STAGE1)
    comps = build_components(cfg_acc, model_cfg)
    opt = make_optimizer(cfg_acc.optim, 1)
    state = create_train_state(params, opt, cfg_acc.seed)
    step = make_train_step(cfg_acc, comps, opt, compiler_options=FAST_COMPILE)
    state, m1 = step(state, halves[0])
    mid = _host(state.params)
    for k in before:  # no update after the first micro-batch
        assert np.array_equal(mid[k], before[k]), k
    state, m2 = step(state, halves[1])

    # per-sample draws follow the global sample index, so the two halves see the same t / noise /
    # reference drops as the big batch: the mean loss and the mean gradient must agree
    loss_acc = (float(m1["loss"]) + float(m2["loss"])) / 2
    loss_rel = abs(loss_acc - m_big[0]["loss"]) / m_big[0]["loss"]
    a, b = _host(s_big.params), _host(state.params)
    keys = [k for k in before if is_trainable(k, 1)]
    d_big = np.concatenate([(a[k] - before[k]).ravel() for k in keys]).astype(np.float64)
    d_acc = np.concatenate([(b[k] - before[k]).ravel() for k in keys]).astype(np.float64)
    rel = np.linalg.norm(d_acc - d_big) / np.linalg.norm(d_big)
    print(f"accumulation: loss rel diff {loss_rel:.2e}, update rel diff {rel:.2e}, "
          f"max abs {np.max(np.abs(d_acc - d_big)):.2e} (max update {np.max(np.abs(d_big)):.2e})")
    assert loss_rel <= 1e-5
    assert rel <= 1e-5


def test_bf16_compute_close_to_fp32(stage1_run, model_cfg, params):
    cfg32, (_, _, m32, _, _) = stage1_run
    cfg16 = _cfg(1, compute_dtype="bfloat16", **STAGE1)
    before, state, m16, _, _ = _run_steps(cfg16, model_cfg, params, [make_batch(B, S, cached=True)])
    after = _host(state.params)
    assert all(v.dtype == np.float32 for v in after.values())          # fp32 master weights
    assert all(np.all(np.isfinite(v)) for v in after.values())
    loss_rel = abs(m16[0]["loss"] - m32[0]["loss"]) / m32[0]["loss"]
    gn_rel = abs(m16[0]["grad_norm"] - m32[0]["grad_norm"]) / m32[0]["grad_norm"]
    print(f"bf16 vs fp32: loss {m16[0]['loss']:.5f} vs {m32[0]['loss']:.5f} (rel {loss_rel:.2e}), "
          f"grad norm rel {gn_rel:.2e}")
    assert loss_rel < 2e-2
    assert gn_rel < 0.1
