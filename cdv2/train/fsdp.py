"""FSDP's weight gather in the compute dtype.

With bf16 compute a sharded weight matrix/kernel (ndim >= 2) is cast to bf16 on its shard and
all-gathered as bf16: half the bytes on the wire and in the gathered buffers. Writing
`constrain(x.astype(bf16), replicated)` is not enough: XLA (measured on XLA:CPU and deviceless
XLA:GPU, jax 0.10.2) moves the convert past the all-gather and sends fp32, even through an explicit
`shard_map` all_gather. Gathering the bf16 BITS (uint16) leaves it nothing to move. The gradient
is the plain cast-and-constrain transpose: the bf16 cotangent cast to fp32 and constrained back to
the shard (the fp32 reduce-scatter), identical to what autodiff of the plain form gives.
Small replicated leaves (biases, norms) are left as they are; other sharded leaves are gathered
as they are.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cdv2.train.mesh import TrainShardings

_BITS = {2: jnp.uint16, 4: jnp.uint32}


def _gather_bits(x, shard, replicated, dtype):
    bits = jax.lax.bitcast_convert_type(x.astype(dtype), _BITS[jnp.dtype(dtype).itemsize])
    bits = jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(bits, shard), replicated)
    return jax.lax.bitcast_convert_type(bits, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def gather_as(x, shard: NamedSharding, replicated: NamedSharding, dtype):
    """x (sharded as `shard`) -> x.astype(dtype), replicated, gathered in `dtype`'s bytes."""
    return _gather_bits(x, shard, replicated, dtype)


def _gather_fwd(x, shard, replicated, dtype):
    return _gather_bits(x, shard, replicated, dtype), jnp.zeros((), x.dtype)


def _gather_bwd(shard, replicated, dtype, like, ct):
    return (jax.lax.with_sharding_constraint(ct.astype(like.dtype), shard),)


gather_as.defvjp(_gather_fwd, _gather_bwd)


def fsdp_gather(shardings: TrainShardings, compute_dtype):
    """params -> params with every fsdp-sharded leaf replicated (the all-gather), floating leaves
    with ndim >= 2 cast to `compute_dtype` on their shard first; None when nothing is sharded."""
    specs = shardings.state.params
    is_sharded = lambda s: any(e is not None for e in s.spec)  # noqa: E731
    if not any(is_sharded(s) for s in jax.tree.leaves(specs)):
        return None
    replicated = NamedSharding(shardings.mesh, P())
    narrow = jnp.dtype(compute_dtype).itemsize in _BITS

    def one(p, s):
        if not is_sharded(s):
            return p
        if p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating) and narrow and jnp.dtype(compute_dtype) != p.dtype:
            return gather_as(p, s, replicated, jnp.dtype(compute_dtype))
        return jax.lax.with_sharding_constraint(p, replicated)

    return lambda params: jax.tree.map(one, params, specs)
