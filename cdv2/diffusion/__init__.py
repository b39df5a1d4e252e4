"""Diffusion math shared by training and inference: the noise schedule (host-side numpy), the
v-prediction algebra, guidance combination and the samplers (pure JAX steps for one jitted loop)."""
