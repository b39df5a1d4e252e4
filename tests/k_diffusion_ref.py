"""Test helper: k-diffusion's `sampling` and `external` modules (PyPI k-diffusion 0.1.1.post1, whose
sampling.py equals the authors' vendored copy) loaded WITHOUT the package __init__, which would
import torchvision, skimage, clip, cleanfid, jsonmerge... (none needed by the samplers). Only
`utils.append_dims` is provided. Also the app's sigma selection (refnet/sampling/sampler.py +
scheduler.py) re-stated on top of k-diffusion's own schedule functions, as the torch reference."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def load():
    """-> (sampling, external) modules, or skip when k-diffusion / torchsde / torchdiffeq are missing."""
    for dep in ("torch", "torchsde", "torchdiffeq", "scipy"):
        pytest.importorskip(dep)
    if "kd_ref.sampling" in sys.modules:
        return sys.modules["kd_ref.sampling"], sys.modules["kd_ref.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion not installed (pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
                    "torchdiffeq trampoline)")
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("kd_ref")
    pkg.__path__ = [root]
    utils = types.ModuleType("kd_ref.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["kd_ref"], sys.modules["kd_ref.utils"] = pkg, utils
    mods = []
    for name in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"kd_ref.{name}", f"{root}/{name}.py")
        mod = importlib.util.module_from_spec(s)
        sys.modules[f"kd_ref.{name}"] = mod
        s.loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods.append(mod)
    return tuple(mods)


# The app's table (refnet/sampling/sampler.py): label -> (function, default schedule, discard, options)
APP_K = {
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False, {}),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", False, {"brownian": True}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", False, {"brownian": True}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "exponential", False, {"brownian": True, "solver_type": "heun"}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", False, {}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", True, {"brownian": True}),
    "Euler a": ("sample_euler_ancestral", None, False, {}),
    "Euler": ("sample_euler", None, False, {}),
    "LMS": ("sample_lms", None, False, {}),
    "Heun": ("sample_heun", None, False, {}),
    "DPM2": ("sample_dpm_2", "karras", True, {}),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", True, {}),
    "DPM fast": ("sample_dpm_fast", None, False, {}),
}


def app_sigmas(sampling, model_wrap, label, schedule, steps):
    """KDiffusionSampler.get_sigmas with the app's schedulers (refnet/sampling/scheduler.py)."""
    import torch

    _f, default, discard, _o = APP_K[label]
    steps += 1 if discard else 0
    name = {"Automatic": default, "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
            "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform"}[schedule]
    smin, smax = model_wrap.sigma_min, model_wrap.sigma_max
    if name is None or name == "uniform":
        sig = model_wrap.get_sigmas(steps)
    elif name == "karras":
        sig = sampling.get_sigmas_karras(n=steps, sigma_min=smin, sigma_max=smax, rho=7.0)
    elif name == "exponential":
        sig = sampling.get_sigmas_exponential(n=steps, sigma_min=smin, sigma_max=smax)
    elif name == "polyexponential":
        sig = sampling.get_sigmas_polyexponential(n=steps, sigma_min=smin, sigma_max=smax, rho=1.0)
    else:  # sgm_uniform
        start = model_wrap.sigma_to_t(torch.tensor(smax))
        end = model_wrap.sigma_to_t(torch.tensor(smin))
        sigs = [model_wrap.t_to_sigma(ts) for ts in torch.linspace(start, end, steps + 1)[:-1]]
        sig = torch.FloatTensor(sigs + [0.0])
    if discard:
        sig = torch.cat([sig[:-2], sig[-1:]])
    return sig
