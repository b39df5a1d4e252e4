"""The app's mask and line networks inside `Colorizer` (issue 11, "Use"): with a converted
preprocessor directory the Colorizer's sketch mask is ISNet-sketch's on the white sketch, its
reference mask the chosen extractor's (dilated), "Remove background in result" the undilated
mask, and the "extract" sketch preprocessor runs the line network; without the weights it falls
back to the estimates, warning once per network. Networks: the random-weight fixtures of
../shared/oracle/preprocessors (ISNet for both ISNet roles, the cheapest line extractor)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err
from cdv2.sample import masks as mask_ops
from cdv2.sample.colorizer import Colorizer
from cdv2.sample.line_extract import preprocess_sketch
from cdv2.sample.preprocessors import Preprocessors
from oracle_v2 import params_for, tiny_v2_config

TOL = 1e-4
SIZE = (128, 64)  # the fixtures' 96 x 64 images fit without resizing (sketch padded top/bottom)


@pytest.fixture(scope="module")
def pre_dir(tmp_path_factory, preprocessors_oracle_dir):
    from cdv2.weights import preprocessors_dir as ppd

    out = tmp_path_factory.mktemp("pre")
    for name, file in (("isnet-sketch", "isnet"), ("isnet", "isnet"), ("lineart_sk", "lineart_sk")):
        ppd.convert_preprocessor(name, preprocessors_oracle_dir / f"{file}_weights.safetensors", out)
    return out


@pytest.fixture(scope="module")
def params(oracle_v2_dir):
    return params_for(oracle_v2_dir)


@pytest.fixture(scope="module")
def col(params, pre_dir):
    return Colorizer(params, tiny_v2_config(), preprocessors=Preprocessors.load(pre_dir))


@pytest.fixture(scope="module")
def io(preprocessors_oracle_dir):
    return dict(np.load(preprocessors_oracle_dir / "isnet_io.npz"))


def test_masks_are_the_networks(col, io):
    """BG enhance: smask = scaled_resize(ISNet-sketch(white_sketch, H, W), 1/8); rmask = the
    extractor's dilated mask of the reference (the torch fixture's app call)."""
    p = col.prepare_inputs(io["sketch_image"], io["image"], mode="background", size=SIZE,
                           sketch_preprocessor="invert", reference_mask="isnet")
    white = -np.asarray(p.inputs.sketch)
    want_full = np.asarray(col.preprocessors.sketch_mask(white, *SIZE))
    np.testing.assert_array_equal(p.inputs.sketch_mask, mask_ops.latent_mask(want_full, (SIZE[0] // 8, SIZE[1] // 8)))
    # the sketch placed as the app does (invert, -1 padding): the fixture's white sketch in the box
    top, left, h, w = p.box
    assert rel_err(white[:, top:top + h, left:left + w], nchw_to_nhwc(io["wrap_sketch_in"])) <= 1e-6
    assert rel_err(nhwc_to_nchw(p.inputs.reference_mask), io["wrap_ref_out_dilate"]) <= TOL


def test_remove_background_uses_the_undilated_mask(col, io):
    x = nchw_to_nhwc(io["wrap_ref_in"])[0]
    m = col._reference_mask(io["image"], None, dilate=False, method="isnet", image=x[None])
    assert rel_err(nhwc_to_nchw(m), io["wrap_ref_out"]) <= TOL
    out = col.remove_background(x, 0.5, method="isnet")
    np.testing.assert_array_equal(out, np.where(m[0] >= 0.5, x, 1.0))


def test_extract_sketch_preprocessor_runs_the_line_network(col, preprocessors_oracle_dir):
    img = dict(np.load(preprocessors_oracle_dir / "lineart_sk_io.npz"))["image"]
    p = col.prepare_inputs(img, img, size=SIZE, sketch_preprocessor="extract", line_extractor="lineart_sk")
    want, box, _ = preprocess_sketch(img, SIZE, "extract", col.preprocessors.network("lineart_sk"))
    np.testing.assert_array_equal(p.inputs.sketch, want)
    assert p.box == box
    inv = col.prepare_inputs(img, img, size=SIZE, sketch_preprocessor="invert")
    assert rel_err(p.inputs.sketch, inv.inputs.sketch) > 1e-2  # the network really ran
    with pytest.raises(LookupError, match="lineart_keras"):  # absent weights: a clear error, no estimate
        col.prepare_inputs(img, img, size=SIZE, sketch_preprocessor="extract")


def test_absent_weights_fall_back_to_estimates_warning_once(params, io):
    col = Colorizer(params, tiny_v2_config())  # no preprocessor directory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p = col.prepare_inputs(io["sketch_image"], io["image"], mode="background", size=SIZE,
                                   sketch_preprocessor="invert")
    msgs = sorted(str(w.message).split(" ")[0] for w in caught)
    assert msgs == ["ISNet-sketch", "rmbg-v2"], msgs  # one per network, not one per call
    rgb = io["image"]
    np.testing.assert_array_equal(p.inputs.reference_mask, mask_ops.estimate_reference_mask(rgb, None))
    # "estimate" asks for the estimate: no warning at all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Colorizer(params, tiny_v2_config()).prepare_inputs(io["sketch_image"], rgb, mode="background", size=SIZE,
                                                           reference_mask="estimate", sketch_mask=np.ones((96, 64)))
    assert not caught
