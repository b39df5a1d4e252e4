"""`cdv2 app`: the authors' colorization UI in Gradio, on the public `Colorizer` API only.

One model copy serves every browser: Gradio's queue runs one generation at a time (others wait in
line, with their position shown) and the jitted programs are reused across requests of the same
size (plus the persistent XLA cache across restarts). Every control is a row of
`cdv2.app.controls`; out-of-range values and bad uploads are refused with a visible message.
"""
from __future__ import annotations

import inspect
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cdv2.app import controls as ctl
from cdv2.sample.seeds import resolve_seed

GROUP_TITLES = {"manipulation": "Text manipulation", "modes": None, "guidance": None, "scales": None,
                "advanced": "Advanced settings", "accurate": "Accurate control on crossattn scale", "run": None}


def save_result(image: Image.Image, settings: dict, folder: Path, index: int) -> Path:
    """PNG with the generation settings (JSON) in its `cdv2` text chunk."""
    info = PngInfo()
    info.add_text("cdv2", json.dumps(settings, sort_keys=True, default=str))
    path = folder / f"cdv2_{time.strftime('%Y%m%d-%H%M%S')}_{settings['seed']}_{index}.png"
    image.save(path, pnginfo=info)
    return path


MIN_SIDE = 16  # px; smaller uploads are refused (an image that small cannot be a sketch or reference)


def check_uploads(**images) -> None:
    """Refuse missing sketch/reference and degenerate images with a message naming the input."""
    for name in ("sketch", "reference"):
        if images.get(name) is None:
            raise gr.Error("Upload a sketch and a reference image first.")
    for name, im in images.items():
        if im is not None and min(im.size) < MIN_SIDE:
            raise gr.Error(f"The {name.replace('_', ' ')} is {im.size[0]}x{im.size[1]} px: too small "
                           f"(at least {MIN_SIDE} px per side).")


def _preview_images(prepared) -> tuple:
    """The preprocessed sketch and the masks generation will use, as displayable images."""
    inp = prepared.inputs
    sketch = Image.fromarray(((np.asarray(inp.sketch[0]) + 1) * 127.5).clip(0, 255).astype(np.uint8))
    out = [sketch, None, None]
    for i, m in ((1, inp.sketch_mask), (2, inp.reference_mask)):
        if m is not None:
            out[i] = Image.fromarray((np.asarray(m[0, ..., 0]) * 255).clip(0, 255).astype(np.uint8))
    return tuple(out)


class App:
    """The handlers (plain methods, testable without a browser) and the Blocks layout."""

    def __init__(self, colorizer, *, samplers, schedules, size_range=(512, 1536), default_size=512,
                 output_dir: Optional[str] = None, title: str = "cdv2: ColorizeDiffusion v2"):
        self.colorizer = colorizer
        api = inspect.signature(colorizer.colorize).parameters
        has_text = "clip_text" in getattr(colorizer, "params", {})  # manipulation needs the text tower
        self.controls = ctl.supported_by(ctl.build_controls(samplers, schedules, size_range, default_size,
                                                            manipulation=has_text), api)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="cdv2-app-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.rng = np.random.default_rng()
        self.last_seed = None

    # -- handlers ---------------------------------------------------------------------------
    def checked(self, sketch, reference, background, sketch_mask, reference_mask, values) -> dict:
        """The settings dict of the control values, after refusing bad uploads and values."""
        check_uploads(sketch=sketch, reference=reference, background=background, sketch_mask=sketch_mask,
                      reference_mask=reference_mask)
        settings = dict(zip([c.key for c in self.controls], values))
        problems = ctl.validate(self.controls, settings)
        if problems:
            raise gr.Error("Invalid settings: " + "; ".join(problems))
        return settings

    def generate(self, sketch, reference, background, sketch_mask, reference_mask, *values, progress=None):
        settings = self.checked(sketch, reference, background, sketch_mask, reference_mask, values)
        seed = resolve_seed(settings["seed"], self.rng)
        kwargs = ctl.to_colorize_kwargs(self.controls, settings, seed)
        if reference_mask is not None:  # an uploaded mask wins over the extractor
            kwargs["reference_mask"] = reference_mask
        try:
            images = self.colorizer.colorize(sketch, reference, background=background, sketch_mask=sketch_mask,
                                             progress=True, **kwargs)
        except (ValueError, OSError, NotImplementedError, LookupError) as e:  # bad input: say so, keep serving
            raise gr.Error(str(e))
        self.last_seed = seed
        record = dict(settings, seed=seed)
        items = [(str(save_result(im, dict(record, index=i), self.output_dir, i)), f"seed {seed} #{i}")
                 for i, im in enumerate(images)]
        modes = [c.label for c in self.controls if c.group == "modes" and settings[c.key]] or ["vanilla"]
        status = f"Done: {len(images)} image(s), seed {seed}, {', '.join(modes)}, {kwargs['steps']} steps."
        return items, status, seed

    def preview(self, sketch, reference, background, sketch_mask, reference_mask, *values):
        settings = self.checked(sketch, reference, background, sketch_mask, reference_mask, values)
        kw = ctl.to_colorize_kwargs(self.controls, settings, 0)
        if reference_mask is not None:
            kw["reference_mask"] = reference_mask
        api = inspect.signature(self.colorizer.prepare_inputs).parameters
        flags = {"style_enhance", "background_enhance", "foreground_enhance", "attention_injection"}
        keep = {k: v for k, v in kw.items() if k in api or k in flags}  # the preprocessing subset
        try:
            prepared = self.colorizer.prepare_inputs(sketch, reference, background=background,
                                                     sketch_mask=sketch_mask, **keep)
        except (ValueError, OSError, NotImplementedError, LookupError) as e:
            raise gr.Error(str(e))
        return _preview_images(prepared)

    # -- layout -----------------------------------------------------------------------------
    def _component(self, c: ctl.Control):
        eid = f"cdv2-{c.key}"
        if c.kind == "check":
            return gr.Checkbox(label=c.label, value=c.default, elem_id=eid, info=c.info or None)
        if c.kind == "text":
            return gr.Textbox(label=c.label, value=c.default, elem_id=eid, info=c.info or None,
                              lines=3 if c.key == "prompt" else 1)
        if c.kind == "choice":
            return gr.Dropdown(choices=list(c.choices), value=c.default, label=c.label, elem_id=eid,
                               info=c.info or None)
        return gr.Slider(label=c.label, minimum=c.minimum, maximum=c.maximum, value=c.default, step=c.step,
                         elem_id=eid, info=c.info or None)

    def blocks(self):
        image = dict(type="pil", height=260, interactive=True, format="png", sources=["upload", "clipboard"])
        with gr.Blocks(title=self.title, analytics_enabled=False, fill_width=True) as demo:
            gr.Markdown(f"## {self.title}\nReference-based sketch colorization. Upload a sketch and a "
                        "reference, pick the modes, then Generate.")
            comps = {}
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    with gr.Row():
                        sketch = gr.Image(label="Sketch", elem_id="cdv2-sketch", **image)
                        reference = gr.Image(label="Reference", elem_id="cdv2-reference", **image)
                        background = gr.Image(label="Background", elem_id="cdv2-background", **image)
                    with gr.Accordion("Masks (optional; white = character)", open=False):
                        with gr.Row():
                            sketch_mask = gr.Image(label="Sketch mask", elem_id="cdv2-sketch-mask", **image)
                            reference_mask = gr.Image(label="Reference mask", elem_id="cdv2-reference-mask",
                                                      **image)
                    for group in ("manipulation", "modes", "guidance", "scales", "advanced", "accurate"):
                        members = [c for c in self.controls if c.group == group]
                        if not members:
                            continue
                        title = GROUP_TITLES[group]
                        ctx = gr.Accordion(title, open=False) if title else gr.Group()
                        with ctx:
                            for i in range(0, len(members), 4):
                                with gr.Row():
                                    for c in members[i:i + 4]:
                                        comps[c.key] = self._component(c)
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Output", elem_id="cdv2-gallery", preview=True, format="png",
                                         show_label=False)
                    run = gr.Button("Generate", variant="primary", elem_id="cdv2-generate")
                    status = gr.Markdown("", elem_id="cdv2-status")
                    with gr.Row():
                        send = gr.Button("Send result to reference", elem_id="cdv2-send")
                        reuse = gr.Button("Reuse seed", elem_id="cdv2-reuse-seed")
                        random_seed = gr.Button("Random seed", elem_id="cdv2-random-seed")
                    run_members = [c for c in self.controls if c.group == "run"]
                    for i in range(0, len(run_members), 3):
                        with gr.Row():
                            for c in run_members[i:i + 3]:
                                comps[c.key] = self._component(c)
                    with gr.Accordion("Preview: preprocessed sketch and masks", open=False):
                        preview = gr.Button("Preview", elem_id="cdv2-preview")
                        with gr.Row():
                            pv_sketch = gr.Image(label="Sketch (model input)", interactive=False)
                            pv_smask = gr.Image(label="Sketch mask", interactive=False)
                            pv_rmask = gr.Image(label="Reference mask", interactive=False)
            values = [comps[c.key] for c in self.controls]
            images = [sketch, reference, background, sketch_mask, reference_mask]
            selected = gr.State(0)

            def _generate(*args, progress=gr.Progress(track_tqdm=True)):
                return self.generate(*args, progress=progress)

            run.click(_generate, inputs=images + values, outputs=[gallery, status, comps["seed"]],
                      concurrency_limit=1, concurrency_id="model")
            preview.click(self.preview, inputs=images + values, outputs=[pv_sketch, pv_smask, pv_rmask],
                          concurrency_limit=1, concurrency_id="model")
            gallery.select(_selected_index, outputs=selected)
            send.click(_send_to_reference, inputs=[gallery, selected], outputs=reference)
            reuse.click(lambda: self.last_seed if self.last_seed is not None else -1, outputs=comps["seed"])
            random_seed.click(lambda: -1, outputs=comps["seed"])
        return demo


def _selected_index(evt: gr.SelectData):
    return evt.index or 0


def _send_to_reference(gallery, index):
    if not gallery:
        raise gr.Error("No result yet.")
    item = gallery[min(int(index or 0), len(gallery) - 1)]
    path = item[0] if isinstance(item, (tuple, list)) else item
    path = getattr(path, "path", None) or (path.get("image", {}).get("path") if isinstance(path, dict) else path)
    return Image.open(path).convert("RGB")
