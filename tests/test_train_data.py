"""The grain training pipeline and the synthetic dataset in the authors' layout (spec §6.5)."""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cdv2.train.collate import (AUTHORS_BUCKETS, CollateConfig, blank_sketch_border,
                                mask_expansion)
from cdv2.train.data import QuartetSource, make_train_iterator, restore_iterator
from cdv2.train.synthetic import KINDS, make_synthetic_dataset

N_IMAGES, BATCH = 24, 4
KW = dict(batch_size=BATCH, resolution=128, multiple=16, return_names=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("syn") / "data"
    make_synthetic_dataset(r, num_images=N_IMAGES, size=(96, 112), num_shards=2, seed=0,
                           aspect_range=(0.6, 1.6))
    return r


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def zip_members(path):
    with zipfile.ZipFile(path) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/"))


# --- synthetic dataset -----------------------------------------------------------------------

def test_synthetic_zip_layout_follows_authors_rule(root):
    stems = ["0000", "0001"]
    for kind in KINDS:
        assert sorted(p.stem for p in (root / kind).glob("*.zip")) == stems
    members = {k: [zip_members(root / k / f"{s}.zip") for s in stems] for k in KINDS}
    assert members["color"] == members["sketch"] == members["mask"]
    assert sum(len(m) for m in members["sketch"]) == N_IMAGES
    for s, names in zip(stems, members["sketch"]):
        for name in names:
            # QuartLoader opens f"{root}/{kind}/{dirname(name)}.zip" (NOTES 18).
            assert os.path.dirname(name) == s
            for kind in KINDS:
                with zipfile.ZipFile(root / kind / f"{os.path.dirname(name)}.zip") as zf:
                    img = Image.open(io.BytesIO(zf.read(name)))
                    img.load()
                    if kind == "mask":
                        assert img.mode == "L"
                        assert set(np.unique(np.asarray(img))) <= {0, 255}
                    if kind == "sketch":
                        a = np.asarray(img.convert("RGB"))
                        assert set(np.unique(a)) <= {0, 255} and (a == 255).mean() > 0.7


def test_synthetic_is_deterministic(tmp_path):
    make_synthetic_dataset(tmp_path / "a", num_images=4, size=(64, 64), seed=5)
    make_synthetic_dataset(tmp_path / "b", num_images=4, size=(64, 64), seed=5)
    make_synthetic_dataset(tmp_path / "c", num_images=4, size=(64, 64), seed=6)
    for kind in KINDS:
        a, b, c = ((tmp_path / d / kind / "0000.zip").read_bytes() for d in "abc")
        assert a == b and a != c


def test_folder_layout_and_missing_file(tmp_path):
    names = make_synthetic_dataset(tmp_path, num_images=9, size=(64, 80), layout="folder")
    for kind in KINDS:
        assert sorted(p.name for p in (tmp_path / kind).glob("*.png")) == sorted(names)
    (tmp_path / "mask" / names[3]).unlink()
    it = make_train_iterator(tmp_path, seed=0, num_epochs=1, shuffle=False, **KW)
    batches = take(it, 2)                              # 9 positions -> 2 full batches, none lost
    with pytest.raises(StopIteration):
        next(it)
    assert it.num_skipped == 1 and it.skipped[0][0] == names[3]
    assert "FileNotFoundError" in it.skipped[0][1]
    seen = [n for b in batches for n in b["name"]]
    # the failed record's place is taken by the next readable one: positions never shift
    assert seen == names[:3] + [names[4]] + names[4:8]


def test_unreadable_dataset_raises_instead_of_looping(tmp_path):
    names = make_synthetic_dataset(tmp_path, num_images=4, size=(64, 64), layout="folder")
    for name in names:
        (tmp_path / "color" / name).write_bytes(b"not a png")
    it = make_train_iterator(tmp_path, seed=0, **dict(KW, batch_size=2))
    with pytest.raises(Exception, match="no readable record"):
        next(it)


# --- pipeline ----------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_differs(root):
    a = take(make_train_iterator(root, seed=0, **KW), 4)
    b = take(make_train_iterator(root, seed=0, **KW), 4)
    c = take(make_train_iterator(root, seed=1, **KW), 4)
    assert_batches_equal(a, b)
    assert any(x["name"].tolist() != y["name"].tolist() for x, y in zip(a, c))
    assert any(x["image"].shape != y["image"].shape or not np.array_equal(x["image"], y["image"])
               for x, y in zip(a, c))


def test_restored_state_continues_identically(root):
    # 24 images / 4 = 6 batches per epoch: the 9 batches cross an epoch boundary.
    full = take(make_train_iterator(root, seed=7, **KW), 9)
    it = make_train_iterator(root, seed=7, **KW)
    head = take(it, 4)
    state = json.loads(json.dumps(it.get_state()))       # survives a JSON round trip
    it.close()
    tail = take(restore_iterator(state), 5)
    assert_batches_equal(full, head + tail)
    # epochs are reshuffled, and each epoch covers the data once
    names = [n for b in full[:6] for n in b["name"]]
    assert len(set(names)) == N_IMAGES
    assert [n for b in full[6:9] for n in b["name"]] != names[:12]
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(root, seed=8, **KW).set_state(state)


def test_restore_with_worker_processes(root):
    kw = dict(KW, worker_count=1)
    it = make_train_iterator(root, seed=2, **kw)
    full = take(it, 5)
    it.close()
    it = make_train_iterator(root, seed=2, **kw)
    head = take(it, 2)
    state = it.get_state()
    it.close()
    it = restore_iterator(state)
    tail = take(it, 3)
    it.close()
    assert_batches_equal(full, head + tail)
    del full, head, tail


def test_corrupt_and_missing_members_are_replaced_and_counted(root, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    corrupt, missing = "0000/000002.png", "0001/000015.png"
    rewrite_zip(bad / "color" / "0000.zip", corrupt, truncate=True)
    rewrite_zip(bad / "mask" / "0001.zip", missing, drop=True)
    assert "error" in QuartetSource(bad)[2]
    good = take(make_train_iterator(root, seed=0, num_epochs=1, **KW), 6)
    it = make_train_iterator(bad, seed=0, num_epochs=1, **KW)
    batches = list(it)                                  # 24 positions -> 6 full batches, as before
    assert len(batches) == 6 and all(b["image"].shape[0] == BATCH for b in batches)
    assert it.num_skipped == 2
    reasons = dict(it.skipped)
    assert set(reasons) == {corrupt, missing}
    assert "KeyError" in reasons[missing]
    seen = {n for b in batches for n in b["name"]}
    assert not seen & {corrupt, missing}
    # same buckets as the intact dataset, batch for batch; only the two replaced samples differ
    assert [b["image"].shape for b in batches] == [b["image"].shape for b in good]
    differ = sum(x != y for b, g in zip(batches, good) for x, y in zip(b["name"], g["name"]))
    assert differ == 2
    # the skip log is part of the checkpoint state
    it2 = make_train_iterator(bad, seed=0, num_epochs=1, **KW)
    take(it2, 5)
    assert restore_iterator(it2.get_state()).num_skipped == it2.num_skipped


def test_batch_shapes_agree_across_hosts_whatever_fails_where(root, tmp_path):
    """Multi-host training assembles one global batch from every host's part, so the k-th batch
    must have the same (H, W) on every host: buckets depend on (seed, batch position) only, and a
    failed record (here: only in host 0's shard) is replaced, never filtered out."""
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    rewrite_zip(bad / "color" / "0000.zip", "0000/000001.png", truncate=True)   # in shard 0 of 2
    shapes = []
    for shard in range(2):
        it = make_train_iterator(bad, seed=5, shard_index=shard, shard_count=2, **KW)
        shapes.append([b["image"].shape for b in take(it, 8)])
        it.close()
    assert shapes[0] == shapes[1]
    assert len(set(shapes[0])) > 1                      # the buckets do vary from step to step


def rewrite_zip(path, member, truncate=False, drop=False):
    with zipfile.ZipFile(path) as zf:
        items = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in items:
            if info.filename == member:
                if drop:
                    continue
                data = data[: len(data) // 2]           # truncated PNG
            zf.writestr(info, data)


def test_batch_shapes_ranges_and_polarity(root):
    cfg = CollateConfig.for_resolution(128, 16)
    sizes = {QuartetSource(root).name(i): QuartetSource(root)[i]["color"].shape[:2]
             for i in range(N_IMAGES)}
    shapes = set()
    for b in take(make_train_iterator(root, seed=3, **KW), 12):
        n, ch, cw, _ = b["image"].shape
        shapes.add((ch, cw))
        assert (ch, cw) in cfg.buckets and n == BATCH
        assert b["sketch"].shape == (n, ch, cw, 3) and b["smask"].shape == (n, ch, cw, 1)
        r = cfg.reference_size
        assert b["reference"].shape == (n, r, r, 3) and b["rmask"].shape == (n, r, r, 1)
        assert all(v.dtype == np.float32 for k, v in b.items() if k != "name")
        for k in ("image", "sketch", "reference"):
            assert -1 <= b[k].min() and b[k].max() <= 1
        for k in ("smask", "rmask"):
            assert 0 <= b[k].min() and b[k].max() <= 1
        # inverted sketch: background -1, black lines -> +1
        assert (b["sketch"] <= -0.99).mean() > 0.7 and (b["sketch"] >= 0.99).any()
        for name, size in zip(b["name"], b["size"]):
            assert tuple(size) == sizes[name]
        for i in range(n):
            assert_crops_aligned(b["image"][i], b["sketch"][i], b["smask"][i, ..., 0])
    assert len(shapes) > 1                              # aspect buckets vary across batches


def assert_crops_aligned(image, sketch, smask):
    """Sketch lines and mask edges must sit on colour edges of the same crop (a colour change
    within 3 px). Aligned crops score >= 0.99 here; a 6 px shift scores about 0.5."""
    def near_colour_edge(sel):
        pad = np.pad(image, ((3, 3), (3, 3), (0, 0)), mode="edge")
        ys, xs = np.nonzero(sel)
        spread = [np.ptp(pad[y:y + 7, x:x + 7], axis=(0, 1)).max() for y, x in zip(ys, xs)]
        return np.mean(np.array(spread) > 0.05) if len(spread) else 1.0

    assert near_colour_edge(sketch[..., 0] > 0.5) > 0.95
    assert near_colour_edge((smask > 0.3) & (smask < 0.7)) > 0.95


def test_bucket_scaling():
    assert CollateConfig.for_resolution(768, 64).buckets == AUTHORS_BUCKETS
    full = CollateConfig.for_resolution(768, 64)
    assert (full.max_load, full.reference_size, full.mask_expansion_size) == (1024, 1024, (60, 40))
    assert (full.center_crop_max, full.center_crop_max2) == (200, 100)
    small = CollateConfig.for_resolution(128, 16)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in small.buckets)
    assert small.buckets.count((128, 128)) == 4


def test_sharding_is_disjoint_and_covers(root):
    names = []
    for shard in range(2):
        it = make_train_iterator(root, seed=0, num_epochs=1, shard_index=shard, shard_count=2, **KW)
        names.append([n for b in it for n in b["name"]])
    assert len(names[0]) == len(names[1]) == N_IMAGES // 2
    assert not set(names[0]) & set(names[1])
    assert set(names[0]) | set(names[1]) == {QuartetSource(root).name(i) for i in range(N_IMAGES)}


# --- collate pieces ----------------------------------------------------------------------------

@pytest.mark.parametrize("hw,grid", [((1024, 1024), (60, 40)), ((37, 53), (5, 7)), ((8, 9), (3, 3))])
def test_mask_expansion_matches_authors_torch(hw, grid):
    m = (np.random.default_rng(0).random(hw) ** 8).astype(np.float32)
    t = torch.from_numpy(m)[None, None]
    pooled = F.max_pool2d(t, kernel_size=grid, stride=grid)
    pad = tuple(s - ((p - 1) * g + g) for s, p, g in zip(hw, pooled.shape[2:], grid))
    ref = F.conv_transpose2d(pooled, torch.ones(1, 1, *grid), stride=grid, output_padding=pad)
    np.testing.assert_array_equal(mask_expansion(m[..., None], *grid)[..., 0], ref[0, 0].numpy())


def test_sketch_border_blanking():
    options = []
    for s in range(400):
        sk = np.zeros((60, 50, 3), np.uint8)
        option, c, c2 = blank_sketch_border(sk, np.random.default_rng(s), 12, 6)
        options.append(option)
        white = sk[..., 0] == 255
        rows, cols = (c, 0) if option == 0 else (0, c) if option == 1 else (c, c2) if option == 2 \
            else (0, 0)
        expect = np.zeros_like(white)
        if rows:
            expect[:rows] = expect[-rows:] = True
        if cols:
            expect[:, :cols] = expect[:, -cols:] = True
        np.testing.assert_array_equal(white, expect)
        assert 0 <= c <= 12 and 0 <= c2 <= 6
    assert min(np.bincount(options, minlength=4)) > 70       # the four options about evenly
