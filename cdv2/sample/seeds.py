"""The app's seeds: the seed rule (-1 = random) and the JAX keys one seed gives to each random draw
of a colorization (x_T, VAE posterior, sampler, attention injection)."""
from __future__ import annotations

import random
MAX_APP_SEED = 429496729  # the authors' MAXM_INT32 (also their seed slider's maximum)


def resolve_seed(seed: int, rng=None) -> int:
    """-1 draws a random seed in [0, MAX_APP_SEED] (from `rng`, a numpy Generator, when given, so a UI
    can show and reuse it); others are used as given, in [0, 2**32)."""
    seed = int(seed)
    if seed == -1:
        return int(rng.integers(0, MAX_APP_SEED + 1)) if rng is not None else random.randint(0, MAX_APP_SEED)
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be -1 (random) or in [0, 2**32), got {seed}")
    return seed


def seed_keys(seed: int):
    """(x_T key, VAE posterior key, sampler key) of a seed. x_T = one N(0,1) draw of shape
    (num_images, h, w, 4): rows differ, as the authors' one randn(bs, ...)."""
    import jax

    key = jax.random.key(seed)
    return key, jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)


def injection_key(seed: int):
    """The key of attention injection's q_sample draws (call k: fold_in(this, k))."""
    import jax

    return jax.random.fold_in(jax.random.key(seed), 3)
