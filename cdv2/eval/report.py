"""Evaluation output: one JSON, a Markdown table and a PNG bar chart per run (no plotting library)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

METRICS = (("fid", "FID ↓"), ("psnr", "PSNR ↑"), ("ms_ssim", "MS-SSIM ↑"), ("clip_similarity", "CLIP sim. ↑"),
           ("part_colour_error", "part colour err. ↓"))


def rows(results: dict) -> list[tuple[str, str, dict]]:
    """{model: {mode: {metric: v}, "n": n}} -> [(model, mode, metrics)]."""
    return [(model, mode, m) for model, res in results.items() for mode, m in res.items() if mode != "n"]


def markdown_table(results: dict) -> str:
    present = [(k, t) for k, t in METRICS if any(k in m for _, _, m in rows(results))]
    head = "| model | mode | " + " | ".join(t for _, t in present) + " |"
    sep = "|---|---|" + "---|" * len(present)
    lines = [head, sep]
    for model, mode, m in rows(results):
        cells = [f"{m[k]:.4f}" if k in m else "–" for k, _ in present]
        lines.append(f"| {model} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path, width: int = 900, panel_h: int = 150) -> Path:
    """One panel per metric, one bar per (model, mode)."""
    entries = rows(results)
    present = [(k, t) for k, t in METRICS if any(k in m for _, _, m in entries)]
    img = Image.new("RGB", (width, panel_h * max(1, len(present)) + 10), "white")
    d = ImageDraw.Draw(img)
    palette = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]
    label_w = 200
    for p, (key, title) in enumerate(present):
        y0 = 5 + p * panel_h
        d.text((5, y0), title, fill="black")
        vals = [m.get(key) for _, _, m in entries]
        top = max([abs(v) for v in vals if v is not None] + [1e-9])
        bar_h = max(4, (panel_h - 30) // max(1, len(entries)))
        for i, ((model, mode, _), v) in enumerate(zip(entries, vals)):
            y = y0 + 18 + i * bar_h
            d.text((5, y), f"{model} / {mode}"[:32], fill="black")
            if v is None:
                continue
            w = int((width - label_w - 80) * abs(v) / top)
            d.rectangle([label_w, y + 1, label_w + w, y + bar_h - 2], fill=palette[i % len(palette)])
            d.text((label_w + w + 4, y), f"{v:.3f}", fill="black")
    img.save(path)
    return Path(path)


def write_report(results: dict, out_dir, meta: dict | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "meta": meta or {}}, indent=1,
                                                 default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
                                      + "\n")
    (out / "results.md").write_text(markdown_table(results))
    bar_chart(results, out / "results.png")
    return {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
