"""Fréchet Inception Distance as pytorch-fid computes it: pool3 features of the FID InceptionV3
(cdv2.modules.inception, weights converted from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
which the user supplies: nothing is downloaded), their mean and covariance (np.cov, rowvar=False),
and the Fréchet distance with scipy's sqrtm (pytorch-fid's `calculate_frechet_distance`, including
its eps fallback for a singular product)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

INCEPTION_FILE_HINT = ("the FID InceptionV3 weights of pytorch-fid: pt_inception-2015-12-05-6726825d.pth "
                       "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                       "pt_inception-2015-12-05-6726825d.pth); pass its path with --inception")


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)), float64, as pytorch-fid."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors (N, D), got shape {f.shape}")
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # pytorch-fid passes disp=False: the same matrix
    if not np.isfinite(covmean).all():  # singular product: pytorch-fid's fallback
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def inception_params_from_state_dict(state: dict) -> dict:
    """pytorch-fid's torch state dict (numpy arrays) -> FIDInceptionV3 params (fc and BatchNorm
    step counters dropped)."""
    from cdv2.weights.torch_layout import state_dict_to_params

    kept = {k: np.asarray(v, np.float32) for k, v in state.items()
            if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")}
    return state_dict_to_params(kept)


def load_inception_params(path) -> dict:
    """Read pytorch-fid's `.pth` (needs torch) or a `.safetensors` / `.npz` export of the same keys."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"InceptionV3 weights not found: {p}; cdv2 needs {INCEPTION_FILE_HINT}")
    if p.suffix == ".npz":
        state = dict(np.load(p))
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(p))
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {p} needs torch (the `torch` extra)") from e
        state = {k: v.numpy() for k, v in torch.load(p, map_location="cpu", weights_only=True).items()}
    if "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{p} is not pytorch-fid's InceptionV3 state dict (no Mixed_7c.branch_pool)")
    return inception_params_from_state_dict(state)


class InceptionFeatures:
    """Jitted pool3 features of uint8/float images in batches: __call__(images (N, H, W, 3) in [0, 1])."""

    def __init__(self, params: dict, batch_size: int = 50):
        import jax

        from cdv2.modules.inception import FIDInceptionV3

        self.params = jax.tree_util.tree_map(jax.numpy.asarray, params)
        self.batch_size = batch_size
        net = FIDInceptionV3()
        self._fn = jax.jit(lambda p, x: net.apply({"params": p}, x))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(np.asarray(self._fn(self.params, np.asarray(images[i:i + self.batch_size], np.float32))))
        return np.concatenate(out, 0)
