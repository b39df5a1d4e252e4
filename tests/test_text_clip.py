"""OpenCLIP text tower: parity with ../shared/oracle/v2's recorded `encode_text` calls and with
transformers' torch CLIPTextModelWithProjection at tiny sizes; key coverage of the full ViT-H-14
text tower; the converter's prefixes, round trip and errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.config import CLIPTextConfig
from cdv2.modules.text_clip import TextTransformer, encode_text_tokens
from cdv2.weights.open_clip_text import (convert_open_clip_text, expected_text_param_shapes,
                                         open_clip_text_config_from_state_dict, params_to_open_clip_text,
                                         text_items)
from conftest import DATA, rel_err


@pytest.fixture(scope="module")
def oracle_text(oracle_v2_dir):
    from safetensors.numpy import load_file

    sd = load_file(str(oracle_v2_dir / "tiny_v2.safetensors"))
    sd = {k: v.astype(np.float32) for k, v in sd.items() if k.startswith("cond_stage_model.transformer.")}
    cfg = open_clip_text_config_from_state_dict(sd, heads=2)  # tiny_v2.yaml: width 32, 2 heads
    return sd, cfg, convert_open_clip_text(sd, cfg)


def test_oracle_text_tower(oracle_text, oracle_v2_dir):
    """Every recorded encode_text call (tokens -> EOT feature), 23-of-24-style clip_skip=1."""
    sd, cfg, params = oracle_text
    assert (cfg.width, cfg.layers, cfg.output_dim, cfg.clip_skip) == (32, 2, 64, 1)
    from cdv2.config import load_model_config

    assert load_model_config("tiny_v2").clip_text == cfg and load_model_config("v2").clip_text == CLIPTextConfig()
    meta = json.loads((oracle_v2_dir / "tiny_v2_fixtures.json").read_text())
    npz = np.load(oracle_v2_dir / "tiny_v2_fixtures.npz")
    get = lambda n: npz[meta["aliases"].get(n, n)]
    n = 0
    for mode in ("manip_target", "manip_prompt", "manip_target_bg"):
        for i in range(len(meta["modes"][mode]["text_encoded_in_order"])):
            tokens, ref = get(f"mode/{mode}/text/{i}/tokens"), get(f"mode/{mode}/text/{i}/emb")
            out = np.asarray(encode_text_tokens(params, tokens, cfg))
            err = rel_err(out, ref)
            print(f"{mode} text {i}: rel err {err:.2e}")
            assert err <= 1e-5
            n += 1
    assert n == 5
    # clip_skip matters: running both blocks gives another feature
    full = CLIPTextConfig(**{**cfg.__dict__, "clip_skip": 0})
    tokens = get("mode/manip_target/text/0/tokens")
    assert rel_err(encode_text_tokens(params, tokens, full), get("mode/manip_target/text/0/emb")) > 1e-3


def test_converter_prefixes_and_round_trip(oracle_text):
    sd, cfg, params = oracle_text
    bare = text_items(sd)
    assert "logit_scale" not in bare and len(bare) == 4 + 1 + 12 * cfg.layers
    model_prefixed = {"model." + k: v for k, v in bare.items()}
    for variant in (bare, model_prefixed, {**bare, "visual.conv1.weight": np.zeros(3), "logit_scale": np.ones(())}):
        other = convert_open_clip_text(variant, cfg)
        back = params_to_open_clip_text(other)
        assert back.keys() == bare.keys()
        assert all(np.array_equal(back[k], bare[k]) for k in bare)


def test_converter_errors(oracle_text):
    sd, cfg, _ = oracle_text
    bare = dict(text_items(sd))
    del bare["ln_final.bias"]
    bare["transformer.resblocks.0.mlp.c_fc.weight"] = np.zeros((7, 32), np.float32)
    with pytest.raises(ValueError) as e:
        convert_open_clip_text(bare, cfg)
    msg = str(e.value)
    assert "missing: ln_final.bias" in msg and "wrong shape: transformer.resblocks.0.mlp.c_fc.weight" in msg
    with pytest.raises(ValueError, match="clip_skip"):
        encode_text_tokens({}, np.zeros((1, 77), np.int64), CLIPTextConfig(width=32, heads=2, layers=2, clip_skip=2))


def test_full_size_key_coverage():
    """The full ViT-H-14 text tower (jax.eval_shape) has exactly the checkpoint's text keys and
    shapes (tests/data/v2_full_keys.json, `cond_stage_model.transformer`), less `logit_scale`."""
    keys = json.loads((DATA / "v2_full_keys.json").read_text())["groups"]["cond_stage_model.transformer"]["keys"]
    prefix = "cond_stage_model.transformer.model."
    want = {k[len(prefix):]: tuple(shape) for k, shape, _ in keys if k != prefix + "logit_scale"}
    shapes = expected_text_param_shapes(CLIPTextConfig())
    from cdv2.weights.open_clip_text import _oc_key_to_path

    got = {}
    for k, shape in want.items():
        path = _oc_key_to_path(k, len(shape))
        assert path in shapes, f"{k} -> {path} not a param of TextTransformer"
        s = shapes[path]
        got[k] = s if k in ("token_embedding.weight", "positional_embedding", "text_projection") else s[::-1]
    assert len(shapes) == len(want) == 293
    assert got == want


def _hf_to_open_clip(sd, layers):
    """transformers CLIPTextModelWithProjection state dict -> open_clip text names (test helper)."""
    g = lambda k: sd[k].detach().numpy()
    out = {"token_embedding.weight": g("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": g("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": g("text_model.final_layer_norm.weight"),
           "ln_final.bias": g("text_model.final_layer_norm.bias"),
           "text_projection": g("text_projection.weight").T}
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[oc + f"attn.in_proj_{leaf}"] = np.concatenate([g(hf + f"self_attn.{c}_proj.{leaf}") for c in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[oc + f"{b}.{leaf}"] = g(hf + f"{a}.{leaf}")
    return out


@pytest.mark.torch
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_matches_transformers_clip_text_model(clip_skip):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from cdv2.sample.tokenizer import tokenize

    layers, width, heads = 3, 48, 3
    hf_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                                         projection_dim=40, eos_token_id=49407, bos_token_id=49406, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = CLIPTextConfig(width=width, heads=heads, layers=layers, output_dim=40, clip_skip=clip_skip)
    params = convert_open_clip_text(_hf_to_open_clip(model.state_dict(), layers), cfg)
    tokens = tokenize(["blue hair", "", "a girl with long silver hair and a red dress, smiling"])
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        hs = model.text_model(input_ids=ids, output_hidden_states=True).hidden_states
        x = model.text_model.final_layer_norm(hs[layers - clip_skip])  # after layers - clip_skip blocks
        x = model.text_projection(x[torch.arange(len(ids)), ids.argmax(-1)])
        ref = (x / x.norm(dim=-1, keepdim=True)).unsqueeze(1).numpy()
        if clip_skip == 0:  # the same as transformers' own pooled projection
            emb = model(input_ids=ids).text_embeds
            np.testing.assert_allclose(ref[:, 0], (emb / emb.norm(dim=-1, keepdim=True)).numpy(), atol=1e-6)
    out = np.asarray(encode_text_tokens(params, tokens, cfg))
    err = rel_err(out, ref)
    print(f"clip_skip={clip_skip}: rel err vs transformers {err:.2e}")
    assert err <= 1e-5
    # unpooled tokens: ln_final + projection on every position
    full = np.asarray(TextTransformer(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32), pooled=False))
    with torch.no_grad():
        ref_full = model.text_projection(model.text_model.final_layer_norm(hs[layers - clip_skip])).numpy()
    assert rel_err(full, ref_full) <= 1e-5
