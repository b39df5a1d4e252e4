"""Text manipulation of the reference's CLIP tokens (the app's `-manipulate` path; ARCHITECTURE §4.9).

A manipulation moves the 256 local CLIP tokens of the reference towards a target text feature,
weighted per token by how strongly the token matches a control text, so that e.g. "blue hair"
recolours only hair tokens. Inputs are the full (B, 257, C) image-tower output (CLS first, the
authors' `encode(reference, "full")`) and unit text features from the text tower
(`cdv2/modules/text_clip.py`). Several manipulations apply in sequence.

Prompt syntax (the app's prompt box, one manipulation per line, as its "Add" button writes them):
    [target] red dress; [anchor] none; [control] dress; [scale] 3.0; [enhanced] False; [ts0] 0.4; [ts1] 0.5; [ts2] 0.6; [ts3] 0.9
plus the direct fields (target, anchor, control, scale, enhance, ts0..ts3), appended when the
target is non-empty. The authors' parser bugs are fixed here (docs/DIFFERENCES.md):
  * "[enhanced] False" is False (theirs: `bool(" False")` = True);
  * an empty anchor means "no anchor" like "none" (theirs: the empty string is encoded as a text);
  * the control "everything" applies the shift to every token uniformly (theirs: the test
    `c != "everything"` compares a tensor with a string, is always true, and "everything" is
    encoded as a control text).
`Manipulation(anchor=None)` / `Manipulation(control=None)` are "no anchor" / "every token"; any
string is encoded as text, so the authors' behaviour is reachable (`anchor=""`,
`control="everything"`), which the parity tests use.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax.numpy as jnp

DEFAULT_THRESHOLDS = (0.5, 0.55, 0.65, 0.95)
EVERYTHING = "everything"
_FIELDS = ("target", "anchor", "control", "scale", "enhanced", "ts0", "ts1", "ts2", "ts3")

EncodeText = Callable[[Sequence[str]], jnp.ndarray]  # n texts -> (n, 1, C) unit features


@dataclasses.dataclass(frozen=True)
class Manipulation:
    target: str
    anchor: Optional[str] = None       # None: no anchor (also the authors' literal "none")
    control: Optional[str] = None      # None: every token (the fixed "everything")
    scale: float = 0.0                 # target scale (the UI's 0..15)
    enhance: bool = False
    thresholds: tuple[float, float, float, float] = DEFAULT_THRESHOLDS

    def __post_init__(self):
        if len(self.thresholds) != 4:
            raise ValueError(f"a manipulation needs 4 thresholds, got {self.thresholds}")
        object.__setattr__(self, "thresholds", tuple(float(x) for x in self.thresholds))

    @property
    def has_anchor(self) -> bool:
        return self.anchor is not None and self.anchor != "none"


def is_active(manipulations: Sequence[Manipulation]) -> bool:
    """The authors' `check_manipulate`: manipulate iff some scale > 0 (then ALL are applied)."""
    return any(m.scale > 0 for m in manipulations)


# ---------------------------------------------------------------- parsing


def _bool_field(value: str, line: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise ValueError(f"manipulation line {line!r}: [enhanced] must be True or False, got {value!r}")


def _optional_text(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = value.strip()
    return None if value in ("", "none") else value


def _control(value: Optional[str]) -> Optional[str]:
    value = "" if value is None else value.strip()
    return None if value == EVERYTHING else value


def parse_line(line: str) -> Manipulation:
    """One prompt-box line -> Manipulation (fields in the app's order, each `[name] value`)."""
    rest = line.strip()
    values = []
    for i, name in enumerate(_FIELDS):
        tag = f"[{name}]"
        if not rest.startswith(tag):
            raise ValueError(f"manipulation line {line!r}: expected {tag} (fields: {' '.join(_FIELDS)})")
        rest = rest[len(tag):]
        if i + 1 < len(_FIELDS):
            sep = f"; [{_FIELDS[i + 1]}]"
            if sep not in rest:
                raise ValueError(f"manipulation line {line!r}: missing '{sep}'")
            value, rest = rest.split(sep, 1)
            rest = f"[{_FIELDS[i + 1]}]" + rest
        else:
            value = rest
        values.append(value[1:] if value.startswith(" ") else value)
    target, anchor, control, scale, enhanced, *ts = values
    try:
        scale_f, ts_f = float(scale), tuple(float(t) for t in ts)
    except ValueError as e:
        raise ValueError(f"manipulation line {line!r}: scale and thresholds must be numbers ({e})") from None
    return Manipulation(target.strip(), _optional_text(anchor), _control(control), scale_f,
                        _bool_field(enhanced, line), ts_f)


def parse_prompts(prompts: Optional[str], target: Optional[str] = None, anchor: Optional[str] = None,
                  control: Optional[str] = None, scale: float = 0.0, ts0: float = DEFAULT_THRESHOLDS[0],
                  ts1: float = DEFAULT_THRESHOLDS[1], ts2: float = DEFAULT_THRESHOLDS[2],
                  ts3: float = DEFAULT_THRESHOLDS[3], enhance: bool = False) -> list[Manipulation]:
    """The app's prompt box (blank lines skipped) followed by the direct fields (used when the
    target is non-empty), as the authors' `backend/functool.parse_prompts`, bugs fixed."""
    out = [parse_line(line) for line in (prompts or "").split("\n") if line.strip()]
    if target is not None and target.strip() != "":
        out.append(Manipulation(target.strip(), _optional_text(anchor), _control(control), float(scale),
                                bool(enhance), (ts0, ts1, ts2, ts3)))
    return out


def format_line(m: Manipulation) -> str:
    """The app's `apppend_prompt` line for `m`; parse_line(format_line(m)) == m except that an
    empty target or control is written "none", as the app does."""
    anchor = "none" if m.anchor is None else m.anchor
    control = EVERYTHING if m.control is None else (m.control or "none")
    t = m.thresholds
    return (f"[target] {m.target or 'none'}; [anchor] {anchor}; [control] {control}; [scale] {m.scale}; "
            f"[enhanced] {m.enhance}; [ts0] {t[0]}; [ts1] {t[1]}; [ts2] {t[2]}; [ts3] {t[3]}")


# ---------------------------------------------------------------- the token shift


def piecewise_weight(s, dscale, thresholds=DEFAULT_THRESHOLDS, ratio: float = 2.0):
    """The authors' `compute_pwv`: s (B, N, 1) token-control similarities, min-max normalised over
    tokens to m; weight -ratio*d for m <= t0, then linear ramps -d..0 on (t0, t1], 0..d/2 on
    (t1, t2], d/2..d on (t2, t3], d above t3. dscale (B, 1, 1)."""
    t0, t1, t2, t3 = thresholds
    lo = jnp.min(s, axis=1, keepdims=True)
    m = (s - lo) / (jnp.max(s, axis=1, keepdims=True) - lo)
    w = jnp.where(m <= t0, -dscale * ratio, -dscale + dscale * (m - t0) / (t1 - t0))
    w = jnp.where(m > t1, 0.5 * dscale * (m - t1) / (t2 - t1), w)
    w = jnp.where(m > t2, 0.5 * dscale + 0.5 * dscale * (m - t2) / (t3 - t2), w)
    return jnp.where(m > t3, dscale, w)


def manipulate_step(v, target_e, m: Manipulation, control_e=None, anchor_e=None):
    """One manipulation of v (B, 1+N, C) (CLS first). target_e / control_e: (1, C) or (B, 1, C);
    anchor_e (B, 1, C) when m.has_anchor; control_e unused when m.control is None."""
    cls, local = v[:, :1], v[:, 1:]
    proj = lambda x, e: x @ jnp.swapaxes(jnp.asarray(e).reshape(-1, 1, e.shape[-1]), -1, -2)  # x . e
    dscale = m.scale - proj(cls, target_e)  # (B, 1, 1)
    if m.has_anchor:
        if m.enhance:
            dscale = m.scale - proj(cls, anchor_e)
        weight = dscale if m.control is None else piecewise_weight(proj(local, control_e), dscale, m.thresholds)
        base = 1.0 if m.enhance else 0.0
        local = local + (weight + base * proj(local, anchor_e)) * (target_e - anchor_e)
    else:
        weight = dscale if m.control is None else piecewise_weight(proj(local, control_e), dscale, m.thresholds)
        local = local + weight * target_e
    return jnp.concatenate([cls, local], axis=1)


def manipulate_tokens(v, manipulations: Sequence[Manipulation], encode_text: EncodeText):
    """The authors' `local_manipulate`: v (B, 1+N, C) full image tokens -> manipulated tokens.
    Text is encoded as they do: controls + targets in one batch (a None control as "everything",
    unused), then each anchor repeated B times when that step runs."""
    if not manipulations:
        return v
    b = v.shape[0]
    n = len(manipulations)
    texts = [EVERYTHING if m.control is None else m.control for m in manipulations] + [m.target for m in manipulations]
    feats = encode_text(texts)  # (2n, 1, C)
    for i, m in enumerate(manipulations):
        anchor_e = encode_text([m.anchor] * b) if m.has_anchor else None
        v = manipulate_step(v, feats[n + i], m, feats[i], anchor_e)
    return v


def make_text_encoder(params, config, dtype=jnp.float32, vocab_path=None) -> EncodeText:
    """texts -> (n, 1, C) unit features through the tokenizer and the (jitted) text tower."""
    import jax

    from cdv2.modules.text_clip import TextTransformer
    from cdv2.sample.tokenizer import tokenize

    fn = jax.jit(lambda p, tok: TextTransformer(config, dtype=dtype).apply({"params": p}, tok))

    def encode(texts: Sequence[str]):
        return fn(params, jnp.asarray(tokenize(list(texts), config.context_length, vocab_path), jnp.int32))

    return encode


def encode_reference_full(params, image, config, dtype=jnp.float32):
    """NHWC reference in [-1, 1] -> (B, 257, C) image tokens, CLS first (`encode(x, "full")`);
    the U-Net context is `manipulate_tokens(...)[:, 1:]`."""
    from cdv2.modules.clip import VisionTransformer, preprocess_for_clip

    pixels = preprocess_for_clip(image, config.image_size)
    return VisionTransformer(config, dtype=dtype).apply({"params": params}, pixels, full=True)


def load_text_tower(path, config):
    """The text tower's params from an open_clip ViT-H-14 file (or any file holding its keys, e.g.
    the authors' single-file checkpoint): the authors' released colorization checkpoint does not
    carry it, so manipulation reads it from the same open_clip file as the image tower."""
    from cdv2.weights.open_clip_text import convert_open_clip_text
    from cdv2.weights.readers import load_state_dict

    return convert_open_clip_text(load_state_dict(str(path)), config)


def app_manipulations(prompt: Optional[str] = "", target_prompt: Optional[str] = "", anchor_prompt: Optional[str] = "",
                      control_prompt: Optional[str] = "", target_scale: float = 0.0,
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS, enhance_manipulation: bool = False,
                      extra: Sequence[Manipulation] = ()) -> list[Manipulation]:
    """The manipulations of the app's fields (`Colorizer.colorize` keywords): the "Final prompt" box
    lines, then the direct fields (when the target is non-empty), then `extra` (explicit
    `Manipulation`s, e.g. the authors' exact parse). Bugs of the authors' parser fixed (see
    `parse_prompts`)."""
    if len(thresholds) != 4:
        raise ValueError(f"thresholds must be 4 numbers (ts0..ts3), got {tuple(thresholds)}")
    out = parse_prompts(prompt, target_prompt, anchor_prompt, control_prompt, float(target_scale),
                        *(float(t) for t in thresholds), enhance=bool(enhance_manipulation))
    for m in extra:
        if not isinstance(m, Manipulation):
            raise TypeError(f"manipulations must be Manipulation objects, got {type(m).__name__}")
    return out + list(extra)
