"""Fitting a (tiny) VAE from scratch: reconstruction + a small KL term.

Not part of the authors' recipe (their VAE is SD's, frozen). The demo needs it: a tiny model
trained from random weights on CPU has no pretrained VAE, and a random one cannot reconstruct
anything, so the demo first fits the tiny VAE to its synthetic images for a few hundred steps.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdv2.modules.vae import AutoencoderKL


def vae_loss(params, vae: AutoencoderKL, images, rng, kl_weight: float = 1e-6):
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = vae.apply({"params": params}, z, method=AutoencoderKL.decode)
    rec = jnp.mean(jnp.abs(recon - images)) + jnp.mean((recon - images) ** 2)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, rec


def make_vae_fit_step(vae: AutoencoderKL, optimizer: optax.GradientTransformation):
    @jax.jit
    def step(params, opt_state, images, rng):
        (loss, rec), grads = jax.value_and_grad(vae_loss, has_aux=True)(params, vae, images, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, rec

    return step


def fit_vae(vae: AutoencoderKL, params: Any, batches, steps: int, lr: float = 1e-3, seed: int = 0,
            on_step=None):
    """Fit `params` to images from `batches` (an iterator of dicts with "image" in [-1,1], NHWC).
    The learning rate decays to 0 over `steps` (cosine): a short fit ends much closer to its
    optimum than at a constant rate."""
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(params)
    step = make_vae_fit_step(vae, optimizer)
    rng = jax.random.key(seed)
    for i in range(steps):
        rng, sub = jax.random.split(rng)
        params, opt_state, loss, rec = step(params, opt_state, jnp.asarray(next(batches)["image"]), sub)
        if on_step is not None:
            on_step(i, float(rec))
    return params


def random_crops(batches, crop: int, seed: int = 0):
    """Random `crop` x `crop` windows of each batch's images (one window per batch). A conv VAE is
    translation-equivariant, so fitting it on crops serves full-size images at a fraction of the cost."""
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = batch["image"]
        i = int(rng.integers(0, x.shape[1] - crop + 1)) if x.shape[1] > crop else 0
        j = int(rng.integers(0, x.shape[2] - crop + 1)) if x.shape[2] > crop else 0
        yield {"image": x[:, i:i + crop, j:j + crop]}
