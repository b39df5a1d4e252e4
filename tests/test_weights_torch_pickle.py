"""Torch `.bin/.pt` checkpoints read without torch (cdv2.weights.readers.torch_pickle), checked
against files that torch.save writes here: every dtype, views, shared storages, wrappers, and
corrupt / legacy / hostile files."""
from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from cdv2.weights.readers import load_state_dict, open_checkpoint
from cdv2.weights.readers.torch_pickle import TorchPickleReader

torch = pytest.importorskip("torch")


def _reference(t) -> np.ndarray:
    """What the reader must return for torch tensor `t` (bf16 bits reinterpreted, not converted)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    out = {
        "f32": torch.randn(3, 4, generator=g), "f64": torch.randn(3, generator=g).double(),
        "f16": torch.randn(2, 3, 4, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-3, 9), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "conv": torch.randn(8, 4, 3, 3, generator=g),
        # views: transposed, sliced with an offset, strided, and two tensors on one storage
        "base": base, "base_T": base.t(), "base_slice": base[2:, 1:4], "base_step": base[::2, ::3],
        "param": torch.nn.Parameter(torch.randn(4, 2, generator=g)),
    }
    out["bf16_T"] = torch.randn(3, 5, generator=g).bfloat16().t()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("pt") / "model.pt"
    torch.save(tensors, path)
    return path


def test_every_dtype_view_and_shared_storage_reads_exactly(saved, tensors):
    with open_checkpoint(saved) as r:
        assert isinstance(r, TorchPickleReader)
        assert r.keys() == list(tensors)
        # the views really share one storage in the file
        assert len({r.record(k).storage.key for k in ("base", "base_T", "base_slice", "base_step")}) == 1
        for k, t in tensors.items():
            want = _reference(t)
            got = r.get(k)
            assert r.shape(k) == tuple(t.shape) and r.dtype(k) == want.dtype, k
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert got.flags.c_contiguous and got.flags.writeable, k
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), k


def test_wrappers_and_non_tensor_entries(tmp_path, tensors):
    path = tmp_path / "lightning.ckpt"
    sd = {"model.w": tensors["f32"], "model.b": tensors["bf16"]}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10, "name": "x", "lr": [1e-4],
                "bytes": b"\x00\x01", "set": {1, 2}}, path)
    got = load_state_dict(path)
    assert sorted(got) == sorted(sd)
    assert np.array_equal(got["model.w"], sd["model.w"].numpy())
    path = tmp_path / "dp.bin"  # DataParallel's "module." prefix is stripped
    torch.save({"module.x": tensors["f16"]}, path)
    assert list(load_state_dict(path, dtype=np.float32)) == ["x"]
    assert load_state_dict(path, dtype=np.float32)["x"].dtype == np.float32


def test_reading_does_not_need_torch(saved):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cdv2.weights.readers import load_state_dict\n"
            f"sd = load_state_dict({str(saved)!r}); print(len(sd), sd['bf16'].dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20", "bfloat16"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["truncated", "garbage", "bad_pickle", "legacy", "global", "missing_storage"])
def test_bad_files_give_one_clear_error_naming_the_file(tmp_path, saved, tensors, case):
    path = tmp_path / f"{case}.bin"
    data = saved.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(b"hello, not a checkpoint" * 10)
    elif case == "legacy":
        torch.save({"w": tensors["f32"]}, path, _use_new_zipfile_serialization=False)
    elif case == "global":
        torch.save({"w": tensors["f32"], "obj": Evil()}, path, pickle_protocol=2)
    else:
        with zipfile.ZipFile(saved) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                body = src.read(info.filename)
                if case == "bad_pickle" and info.filename.endswith("data.pkl"):
                    body = body[:40]
                if case == "missing_storage" and info.filename.endswith("/data/0"):
                    continue
                dst.writestr(info.filename, body)
    with pytest.raises(ValueError) as err:
        with open_checkpoint(path) as r:
            for k in r.keys():
                r.get(k)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    if case == "legacy":
        assert "legacy" in msg and "not supported" in msg
    if case == "global":
        assert "builtins.print" in msg and "no code" in msg


def test_restricted_unpickler_runs_no_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="builtins.print"):
        open_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_convert_cli_reports_a_corrupt_bin_in_one_line(tmp_path, saved, capsys):
    from cdv2.cli import convert

    bad = tmp_path / "v2.bin"
    bad.write_bytes(saved.read_bytes()[:300])
    assert convert.main(["--checkpoint", str(bad), "--config", "tiny", "--out", str(tmp_path / "w"),
                         "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
