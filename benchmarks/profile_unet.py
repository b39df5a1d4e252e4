"""Where one U-Net step spends its time, per op kind: cdv2 (XLA's own profile) next to torch
(diffusers, torch.profiler) for the same plain SD2.1 U-Net shape (benchmarks/torch_compare.py).

    python -m benchmarks.profile_unet --channels 320 --latent 48 --batch 2
    python -m benchmarks.profile_unet --channels 320 --latent 64 --append-md

Each side runs in its own child process (as torch_compare: no idle thread pool of the other
framework spinning on the cores), compiles / warms up once, then profiles `--steps` steps.

jax: `jax.profiler` trace of the compiled step; every XLA:CPU thunk reports an event named after
its HLO instruction. Instructions are classified from the optimized HLO (`compiled.as_text()`):
the ops a fusion contains, their shapes and their `op_name` metadata (the flax module path), e.g.
`.../input_blocks_1_1/transformer_blocks_0/attn1/...`. Loop/call thunks (the query-chunked
attention's `while`) are skipped: their body ops report themselves.
torch: `torch.profiler` self CPU time of every aten op, classified by op name and input shapes.

Categories: conv kxk Cin->Cout at its input size (stride 2 marked), attention core (scores,
softmax, AV) by tokens, linear layers (attention q/k/v/out, GEGLU-FF in / out, other),
GroupNorm (+ the SiLU after it), LayerNorm, the GEGLU gate (gelu x value), everything else.
The thunks of one XLA step may overlap on the thread pool and the profiler adds overhead, so
the op sums are compared with the profiled wall time of the step."""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import common

CONV_NAMES = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::thnn_conv2d",
              "aten::_slow_conv2d_forward", "aten::_nnpack_spatial_convolution")
ATTN_NAMES = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
              "aten::_flash_attention_forward")


# -- shared labels --------------------------------------------------------------------------------
def conv_label(k: int, cin: int, cout: int, h: int, w: int, stride: int) -> str:
    return f"conv {k}x{k} {cin}->{cout} @{h}x{w}" + (" /2" if stride > 1 else "")


def attn_label(kind: str, n: int, m: int) -> str:
    return f"attention core {kind} {n}x{m}"


def linear_label(k: int, n: int) -> str:
    """Linear layer in -> out features; the U-Net's kinds follow from the shape."""
    if n == 8 * k:
        return "linear: GEGLU-FF in (C->8C)"
    if k == 4 * n:
        return "linear: GEGLU-FF out (4C->C)"
    return "linear: attention q/k/v/out + time emb"


# -- jax side ---------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> dict:
    """name -> {op, shape, operands, op_name, calls, comp}; also per computation its instructions."""
    instrs, comps, comp = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            comp = line.split("(")[0].replace("ENTRY", "").strip().lstrip("%").strip()
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        calls = re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        window = re.search(r"window=\{([^}]*)\}", rest)
        instrs[name] = dict(op=op, shape=shape, operands=operands, calls=calls, comp=comp,
                            op_name=op_name.group(1) if op_name else "", window=window.group(1) if window else "")
        comps[comp].append(name)
    return {"instrs": instrs, "comps": comps}


def _contained(hlo: dict, name: str, depth: int = 0) -> list[dict]:
    """The instruction and, for fusions, every instruction of its fused computation(s)."""
    ins = hlo["instrs"][name]
    out = [ins]
    if ins["op"] == "fusion" and depth < 3:
        for c in ins["calls"]:
            for n in hlo["comps"].get(c, []):
                out += _contained(hlo, n, depth + 1)
    return out


def _block(op_name: str) -> str:
    m = re.search(r"/UNet/((?:input|output)_blocks_\d+_\d+|middle_block_\d+)/", op_name)
    return m.group(1) if m else ""


def classify_jax(hlo: dict, name: str, tokens_of_block: dict, ctx_tokens: int) -> str:
    ops = _contained(hlo, name)
    names = [o["op_name"] for o in ops if o["op_name"]]
    for o in ops:
        if o["op"] == "convolution":
            comp_shapes = {n: hlo["instrs"][n]["shape"] for n in hlo["comps"][o["comp"]]}
            x, wt = (_dims(comp_shapes.get(n, "")) for n in o["operands"][:2])
            stride = 2 if "stride=2" in o["window"] else 1
            if len(x) == 4 and len(wt) == 4:
                return conv_label(wt[0], wt[2], wt[3], x[1], x[2], stride)
            return "conv (other)"
    joined = " ".join(names)
    for o in ops:
        if o["op"] == "dot":
            n = o["op_name"]
            if re.search(r"/(to_q|to_k|to_v|to_out_0|emb_layers_1|time_embed_\d)/", n):
                return "linear: attention q/k/v/out + time emb"
            if "/ff/net_0/" in n:
                return "linear: GEGLU-FF in (C->8C)"
            if "/ff/net_2/" in n:
                return "linear: GEGLU-FF out (4C->C)"
    m = re.search(r"/(attn[12])/", joined)
    if m and not re.search(r"/(to_q|to_k|to_v|to_out_0)/", joined):
        nq = tokens_of_block.get(_block(names[0]), 0)
        return attn_label("self" if m.group(1) == "attn1" else "cross", nq, nq if m.group(1) == "attn1" else ctx_tokens)
    if re.search(r"/(in_layers_0|out_layers_0|norm|out_0)/|jit\(silu\)", joined):
        return "GroupNorm (+SiLU)"
    if re.search(r"/norm[123]/", joined):
        return "LayerNorm"
    if "/ff/net_0/" in joined:
        return "GEGLU gate (gelu x value)"
    return "elementwise / copies / other"


def jax_child(args) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.torch_compare import plain_sd_config
    from cdv2.model import resolve_attention
    from cdv2.modules.unet import UNet

    model_cfg = plain_sd_config(args.channels, args.context_dim)
    cfg = model_cfg.unet
    unet = UNet(cfg, resolve_attention(args.jax_attention, jnp.float32))
    params = common.unet_params(model_cfg)
    b, L = args.batch, args.latent
    x = jax.random.normal(jax.random.PRNGKey(0), (b, L, L, cfg.in_channels))
    t = jnp.full((b,), 500.0)
    c = jax.random.normal(jax.random.PRNGKey(1), (b, args.tokens, cfg.context_dim))
    compiled = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(params, x, t, c).compile()
    jax.block_until_ready(compiled(params, x, t, c))
    s = time.perf_counter()
    jax.block_until_ready(compiled(params, x, t, c))
    plain_s = time.perf_counter() - s
    hlo = parse_hlo(compiled.as_text())
    tokens_of_block = {}
    for ins in hlo["instrs"].values():
        if ins["op"] == "convolution" and "/proj_in/" in ins["op_name"]:
            shp = _dims(ins["shape"])
            tokens_of_block[_block(ins["op_name"])] = shp[1] * shp[2]
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        s = time.perf_counter()
        for _ in range(args.steps):
            jax.block_until_ready(compiled(params, x, t, c))
        wall_s = (time.perf_counter() - s) / args.steps
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[-1])
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                if op and op in hlo["instrs"] and hlo["instrs"][op]["op"] not in ("while", "call", "conditional"):
                    per_op[op] += ev.duration_ns / 1e6 / args.steps
    cats, other = collections.Counter(), collections.Counter()
    for op, ms in per_op.items():
        cat = classify_jax(hlo, op, tokens_of_block, args.tokens)
        cats[cat] += ms
        if cat.startswith("elementwise"):  # what "other" is: the op and its first module path
            names = [o["op_name"] for o in _contained(hlo, op) if o["op_name"]]
            other[f"{op} ({names[0].split('/', 1)[-1] if names else '?'})"] += ms
    return {"categories": dict(cats), "wall_ms": 1e3 * wall_s, "unprofiled_ms": 1e3 * plain_s,
            "top_ops": per_op.most_common(15), "top_other": other.most_common(12)}


# -- torch side -------------------------------------------------------------------------------------
def classify_torch(name: str, shapes: list, concrete: list, C: int) -> str:
    if name in CONV_NAMES:
        x, wt = shapes[0], shapes[1]
        stride = int(concrete[3][0]) if concrete and isinstance(concrete[3], (list, tuple)) and concrete[3] else 1
        return conv_label(wt[2], wt[1], wt[0], x[2], x[3], stride)
    if name in ATTN_NAMES:
        q, k = shapes[0], shapes[1]
        return attn_label("self" if q[2] == k[2] and k[2] != 0 else "cross", q[2], k[2])
    if name in ("aten::addmm", "aten::mm"):
        a, wt = (shapes[1], shapes[2]) if name == "aten::addmm" else (shapes[0], shapes[1])
        return linear_label(a[-1], wt[-1])
    if name == "aten::bmm":
        return "linear: attention q/k/v/out + time emb"
    if name in ("aten::native_group_norm", "aten::silu", "aten::silu_"):
        return "GroupNorm (+SiLU)"
    if name == "aten::native_layer_norm":
        return "LayerNorm"
    if name == "aten::gelu" or (name == "aten::mul" and shapes and len(shapes[0]) == 3
                                and shapes[0][-1] in (4 * C, 8 * C, 16 * C, 32 * C)):
        return "GEGLU gate (gelu x value)"
    return "elementwise / copies / other"


def torch_child(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.torch_compare import diffusers_unet, plain_sd_config

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = plain_sd_config(args.channels, args.context_dim).unet
    torch.manual_seed(0)
    model = diffusers_unet(cfg, args.latent)
    x = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent)
    t = torch.full((args.batch,), 500.0)
    c = torch.randn(args.batch, args.tokens, cfg.context_dim)
    with torch.inference_mode():
        model(x, t, encoder_hidden_states=c)
        s = time.perf_counter()
        model(x, t, encoder_hidden_states=c)
        plain_s = time.perf_counter() - s
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            s = time.perf_counter()
            for _ in range(args.steps):
                model(x, t, encoder_hidden_states=c)
            wall_s = (time.perf_counter() - s) / args.steps
    cats = collections.Counter()
    top = collections.Counter()
    for ev in prof.events():
        if ev.self_cpu_time_total <= 0:
            continue
        ms = ev.self_cpu_time_total / 1e3 / args.steps
        concrete = None
        if ev.name in CONV_NAMES:  # the stride is an argument of the aten::convolution above the kernel
            up = ev
            while up is not None and up.name != "aten::convolution":
                up = up.cpu_parent
            concrete = getattr(up, "concrete_inputs", None) if up is not None else None
        cats[classify_torch(ev.name, ev.input_shapes, concrete, cfg.model_channels)] += ms
        top[ev.name] += ms
    return {"categories": dict(cats), "wall_ms": 1e3 * wall_s, "unprofiled_ms": 1e3 * plain_s,
            "top_ops": top.most_common(15)}


# -- parent ---------------------------------------------------------------------------------------------
def _sort_key(label: str):
    order = ("conv", "attention", "linear", "GroupNorm", "LayerNorm", "GEGLU", "elementwise")
    kind = next((i for i, k in enumerate(order) if label.startswith(k)), len(order))
    nums = [int(n) for n in re.findall(r"\d+", label)]
    return (kind, [-n for n in nums[-2:]] if kind <= 1 else [], label)


def table(jx: dict, tr: dict) -> list[list]:
    labels = sorted(set(jx["categories"]) | set(tr["categories"]), key=_sort_key)
    rows, sub = [], collections.defaultdict(lambda: [0.0, 0.0])
    for lab in labels:
        j, t = jx["categories"].get(lab, 0.0), tr["categories"].get(lab, 0.0)
        kind = lab.split()[0].rstrip(":")
        sub[kind][0] += j
        sub[kind][1] += t
        rows.append([lab, j, t, j / t if t else None])
    for kind, (j, t) in sub.items():
        rows.append([f"**all {kind}**", j, t, j / t if t else None])
    tj, tt = sum(jx["categories"].values()), sum(tr["categories"].values())
    rows.append(["**sum of op times**", tj, tt, tj / tt])
    rows.append(["**profiled step (wall)**", jx["wall_ms"], tr["wall_ms"], jx["wall_ms"] / tr["wall_ms"]])
    rows.append(["**unprofiled step (wall)**", jx["unprofiled_ms"], tr["unprofiled_ms"],
                 jx["unprofiled_ms"] / tr["unprofiled_ms"]])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--context-dim", type=int, default=1024)
    ap.add_argument("--latent", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1, help="profiled steps (after one warm-up)")
    ap.add_argument("--jax-attention", choices=("auto", "xla", "chunked", "library"), default="auto")
    ap.add_argument("--child", choices=("torch", "jax"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--append-md", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps((jax_child if args.child == "jax" else torch_child)(args)))
        return
    res = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, "-m", "benchmarks.profile_unet", *(sys.argv[1:] if argv is None else argv),
               "--child", side]
        out = subprocess.run([a for a in cmd if a != "--append-md"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{side} child failed:\n{out.stderr[-3000:]}")
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = table(res["jax"], res["torch"])
    print(f"U-Net mc {args.channels}, latent {args.latent}², batch {args.batch}, {args.tokens} tokens, fp32; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'op kind':48s} {'jax ms':>9s} {'torch ms':>9s} {'jax/torch':>9s}")
    for lab, j, t, r in rows:
        print(f"{lab:48s} {j:9.1f} {t:9.1f} {'' if r is None else f'{r:9.2f}'}")
    for side in ("jax", "torch"):
        print(f"top {side} ops:", ", ".join(f"{n} {ms:.0f}" for n, ms in res[side]["top_ops"][:10]))
    print("top jax 'elementwise / copies / other':", "; ".join(f"{n} {ms:.0f}" for n, ms in res["jax"]["top_other"]))
    info = common.device_info()
    if args.json:
        common.write_json(args.json, {"benchmark": "profile_unet", "command": common.command_line(),
                                      "device": info, "results": res, "note": args.note})
    if args.append_md:
        notes = (f"plain SD2.1 U-Net, model_channels {args.channels}, latent {args.latent}x{args.latent}, batch "
                 f"{args.batch}, {args.tokens} tokens, fp32, one profiled step per side in its own process; jax: "
                 f"XLA thunk times from jax.profiler, torch: torch.profiler self CPU time; load average "
                 f"{os.getloadavg()[0]:.2f} at the end. {args.note}").strip()
        common.append_markdown("U-Net step profile per op kind, jax vs torch, CPU",
                               ["op kind", "jax ms", "torch ms", "jax/torch"], rows, notes, info)


if __name__ == "__main__":
    main()
