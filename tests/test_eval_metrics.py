"""Evaluation metrics against their reference implementations: the FID formula and the FID
InceptionV3 against pytorch-fid (torchvision stubbed from torch.nn, see torchvision_inception_stub),
MS-SSIM against pytorch-msssim, PSNR against torch; the TPS warp on known cases."""
import numpy as np
import pytest

from cdv2.eval import fid, image_metrics, tps

torch = pytest.importorskip("torch")


def _pytorch_fid():
    import torchvision_inception_stub

    torchvision_inception_stub.install()
    return pytest.importorskip("pytorch_fid")


@pytest.mark.torch
def test_fid_formula_matches_pytorch_fid():
    _pytorch_fid()
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 64))
    b = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    want = calculate_frechet_distance(mu1, s1, mu2, s2)
    got = fid.fid_from_features(a, b)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want))
    assert abs(fid.fid_from_features(a, a)) < 1e-6                      # a set against itself
    # a rank-deficient pair (fewer samples than dimensions) goes through the same eps fallback
    c, d = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.1
    want = calculate_frechet_distance(*fid.feature_statistics(c), *fid.feature_statistics(d))
    assert abs(fid.fid_from_features(c, d) - want) <= 1e-6 * max(1.0, abs(want))


def _randomise(module, gen):
    """Random weights with non-trivial BatchNorm statistics (a default init has mean 0, var 1)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bn.bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
            else:
                fan_in = int(np.prod(t.shape[1:])) if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


@pytest.mark.torch
def test_inception_matches_pytorch_fid_on_random_weights(monkeypatch):
    _pytorch_fid()
    import pytorch_fid.inception as pfi

    gen = torch.Generator().manual_seed(0)
    holder = {}

    def fake_download(*args, **kwargs):  # pytorch-fid loads its weights from a URL: give it ours
        return holder["state"]

    # build once to learn the keys, randomise, then let pytorch-fid build and load it
    base = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, blk in (("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                      ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                      ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                      ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                      ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
        setattr(base, name, blk)
    _randomise(base, gen)
    holder["state"] = base.state_dict()
    monkeypatch.setattr(pfi, "load_state_dict_from_url", fake_download)
    net = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()

    images = torch.rand((2, 3, 72, 56), generator=gen)
    with torch.no_grad():
        want = net(images)[0][:, :, 0, 0].numpy()
    params = fid.inception_params_from_state_dict({k: v.numpy() for k, v in holder["state"].items()})
    got = fid.InceptionFeatures(params)(images.permute(0, 2, 3, 1).numpy())
    assert got.shape == (2, 2048)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, err


@pytest.mark.torch
def test_ms_ssim_and_psnr_match_torch_references():
    pms = pytest.importorskip("pytorch_msssim")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 181, 170, 3))
    y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255)
    y[1] = np.clip(x[1] * 0.7 + 40, 0, 255)
    tx, ty = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))
    want = pms.ms_ssim(tx, ty, data_range=255, size_average=False).numpy()
    got = image_metrics.ms_ssim(x, y, data_range=255)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mse = ((tx - ty) ** 2).flatten(1).mean(1)
    np.testing.assert_allclose(image_metrics.psnr(x, y), (10 * torch.log10(255.0 ** 2 / mse)).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="160"):
        image_metrics.ms_ssim(x[:, :64, :64], y[:, :64, :64])
    assert image_metrics.ms_ssim_any_size(x[:, :64, :64], x[:, :64, :64]) == pytest.approx(1.0)


def test_tps_identity_and_interpolation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    assert (tps.tps_warp(img, rng, strength=0.0) == img).all()      # no displacement: the image itself
    src = rng.uniform(-1, 1, (9, 2))
    dst = src + rng.uniform(-0.2, 0.2, src.shape)
    coef = tps.tps_fit(src, dst)
    np.testing.assert_allclose(tps.tps_apply(coef, src, src), dst, atol=1e-9)  # passes through the points
    warped = tps.tps_warp(img, np.random.default_rng(1), strength=0.15)
    assert warped.shape == img.shape and warped.dtype == np.uint8 and (warped != img).mean() > 0.5
