"""Build and launch the app: load the weights once, pick the sampler/schedule lists and sizes."""
from __future__ import annotations

from typing import Optional

from cdv2.app.ui import App
from cdv2.diffusion.samplers import APP_SAMPLERS as SAMPLERS, APP_SCHEDULES as SCHEDULES


def make_app(weights: Optional[str], *, clip: Optional[str] = None, config: Optional[str] = None,
             dtype: str = "float32", output_dir: Optional[str] = None, preprocessors: Optional[str] = None) -> "Server":
    from cdv2.sample.colorizer import Colorizer

    if weights is None:
        from cdv2.demo import DEMO_WEIGHTS

        weights, title = DEMO_WEIGHTS, "cdv2 (built-in demo model: synthetic shapes only)"
    else:
        title = "cdv2: ColorizeDiffusion v2"
    col = Colorizer.from_pretrained(weights, clip=clip, config=config, dtype=dtype, preprocessors=preprocessors)
    small = col.config.image_size < 512  # tiny/demo models: allow small generation sizes
    app = App(col, samplers=SAMPLERS, schedules=SCHEDULES, size_range=(64, 1536) if small else (512, 1536),
              default_size=col.config.image_size if small else 512, output_dir=output_dir, title=title)
    return Server(app)


class Server:
    def __init__(self, app: App):
        self.app = app
        self.demo = app.blocks()
        self.demo.queue(default_concurrency_limit=1)

    def launch(self, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
        """Serve; with block=False return at once (tests) and stop with `close()`."""
        import gradio as gr

        return self.demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                                show_error=True, quiet=not block, theme=gr.themes.Soft(),
                                allowed_paths=[str(self.app.output_dir)])

    def close(self):
        self.demo.close()
