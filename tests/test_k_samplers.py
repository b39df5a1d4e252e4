"""k-diffusion samplers x the app's schedules against k-diffusion itself (torch), on a toy v-model.

Reference: the authors' path = `CompVisVDenoiser` semantics (k-diffusion's `DiscreteVDDPMDenoiser`
over the authors' float32 alphas_cumprod buffer) + the app's sigma selection + the k-diffusion
sampling function with eta 1 / s_noise 1 as the app passes them; every random draw the reference
makes (its noise sampler, Brownian tree included) is recorded and injected into ours. Compared: the
sigmas, and the U-Net input (x * c_in, t) of EVERY model call plus the final latent, each as
max|ours - ref| / max|ref|."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.diffusion import schedule as sch
from cdv2.diffusion.samplers import K_SAMPLERS, make_sampler, sample
import k_diffusion_ref as kref

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
TOL = 1e-5
SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform"]
LABELS = list(kref.APP_K)
SHAPE = (1, 4, 4, 4)


def toy_v_np(x, t):
    return 0.3 * torch.tanh(x) + 1e-3 * t.reshape(-1, 1, 1, 1) * x


def toy_v_jnp(x, t):
    return 0.3 * jnp.tanh(x) + 1e-3 * t * x


class Recorder:
    def __init__(self):
        self.x, self.t = [], []

    def __call__(self, x, t, **kw):
        self.x.append(x.numpy().copy())
        self.t.append(t.numpy().copy())
        return toy_v_np(x, t)


def reference(label, schedule, steps, noise_np, seed=0):
    sampling, external = kref.load()
    ac = torch.from_numpy(sch.ldm_alphas_cumprod())
    rec = Recorder()
    wrap = external.DiscreteVDDPMDenoiser(rec, ac, quantize=False)
    sigmas = kref.app_sigmas(sampling, wrap, label, schedule, steps)
    fname, _d, _disc, opts = kref.APP_K[label]
    fn = getattr(sampling, fname)
    x = torch.from_numpy(noise_np) * sigmas[0]
    draws = []
    if opts.get("brownian"):
        smin, smax = sigmas[sigmas > 0].min(), sigmas.max()
        tree = sampling.BrownianTreeNoiseSampler(x, smin, smax, seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def noise_sampler(s, s_next):
        z = tree(s, s_next) if opts.get("brownian") else torch.randn(x.shape, generator=gen)
        draws.append(z.numpy().copy())
        return z

    import inspect
    params = inspect.signature(fn).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = 1.0
    if "noise_sampler" in params:
        kw["noise_sampler"] = noise_sampler
    if "solver_type" in opts:
        kw["solver_type"] = opts["solver_type"]
    if "sigmas" in params:
        kw["sigmas"] = sigmas
    if "n" in params:  # DPM fast
        kw.update(n=steps, sigma_min=sigmas[sigmas > 0].min(), sigma_max=sigmas.max())
    out = fn(wrap, x, disable=True, **kw)
    return dict(sigmas=sigmas.numpy(), x_in=np.stack(rec.x), t_in=np.stack(rec.t)[:, 0], out=out.numpy(),
                draws=np.stack(draws) if draws else None)


def ours(smp, noise_np, draws, sigmas):
    """One jit per sampler: the schedule is a traced input, so every schedule reuses it."""
    inj = None if draws is None else jnp.asarray(draws)
    out, (x_in, t_in) = _run(smp, jnp.asarray(noise_np), inj, jnp.asarray(sigmas))
    return np.asarray(out), np.asarray(x_in), np.asarray(t_in)


_JITS = {}


def _run(smp, x, nz, sig):
    key = (smp.name, smp.steps, nz is None)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda x, nz, sig, s=smp: sample(s, toy_v_jnp, x, None, nz, sigmas=sig,
                                                              record_calls=True))
    return _JITS[key](x, nz, sig)


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("label", LABELS)
def test_sampler_matches_k_diffusion(label):
    steps = 6
    noise = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    worst = 0.0
    for schedule in SCHEDULES:
        ref = reference(label, schedule, steps, noise)
        smp = make_sampler(label, steps, schedule)
        # the compiled loop is built from the Automatic sampler; other schedules only change `sigmas`
        out, x_in, t_in = ours(make_sampler(label, steps), noise, ref["draws"], smp.sigmas)
        # sigmas: float32 on both sides, equal up to libm ulps
        np.testing.assert_allclose(smp.sigmas, ref["sigmas"], rtol=2e-6, atol=0, err_msg=schedule)
        assert smp.num_calls == len(ref["x_in"]), (smp.num_calls, len(ref["x_in"]))
        if ref["draws"] is not None:
            assert smp.num_draws == len(ref["draws"])
        errs = [rel(x_in[k], ref["x_in"][k]) for k in range(smp.num_calls)]
        t_err = np.abs(t_in - ref["t_in"]).max()
        final = rel(out, ref["out"])
        print(f"{label:18s} {schedule:16s} calls={smp.num_calls:2d} max call err {max(errs):.1e} "
              f"t err {t_err:.1e} final {final:.1e}")
        assert max(errs) <= TOL and final <= TOL, (schedule, errs, final)
        assert t_err <= 1e-3  # t in [0, 999] float32: a few ulps
        assert np.abs(ref["out"] - noise * ref["sigmas"][0]).max() > 0.1  # the run really moved
        worst = max(worst, max(errs), final)
    assert len([k for k in _JITS if k[0] == make_sampler(label, steps).name]) == 1


def test_every_app_sampler_is_offered():
    assert {v[0] for v in K_SAMPLERS.values()} == set(LABELS) | {"DPM adaptive"}
    with pytest.raises(NotImplementedError, match="DPM adaptive"):
        make_sampler("DPM adaptive", 8)


def test_schedule_change_does_not_recompile():
    """sigmas / eta / s_noise / key are traced: one compilation for every schedule of a step count."""
    smp = make_sampler("DPM++ 2M SDE", 6)
    traces = []

    @jax.jit
    def run(x, key, sig, eta):
        traces.append(1)
        return sample(smp, toy_v_jnp, x, key, sigmas=sig, eta=eta)

    x = jnp.ones(SHAPE)
    outs = []
    for i, sched in enumerate(SCHEDULES[1:]):
        sig = make_sampler("DPM++ 2M SDE", 6, sched).sigmas
        outs.append(run(x, jax.random.PRNGKey(i), jnp.asarray(sig), 1.0 - 0.1 * i))
    assert len(traces) == 1
    assert len({float(jnp.abs(o).sum()) for o in outs}) == len(outs)
