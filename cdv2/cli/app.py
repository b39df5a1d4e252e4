"""`cdv2 app --weights DIR [--host 127.0.0.1 --port 7860]`: the colorization UI in a browser.

Needs the `app` extra (`pip install -e ".[app]"`). Without --weights it serves the built-in demo
model, so the UI works on a fresh machine."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cdv2 app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="cdv2 weights directory or the authors' checkpoint (default: the "
                    "built-in demo model)")
    ap.add_argument("--clip", help="open_clip ViT-H-14 file, when --weights is an authors' file without CLIP")
    ap.add_argument("--config", help="model config name or YAML path for an authors' checkpoint")
    ap.add_argument("--preprocessors", help="converted mask/line networks (cdv2 convert --preprocessor); "
                    "without them masks are estimated")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    ap.add_argument("--port", type=int, default=7860, help="port to listen on")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--outputs", help="folder for the generated PNGs (default: a temporary folder)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the app needs gradio: pip install -e ".[app]"', file=sys.stderr)
        return 2
    from cdv2.app.serve import make_app
    from cdv2.sample import compile_cache

    compile_cache.enable()

    try:
        app = make_app(args.weights, clip=args.clip, config=args.config, dtype=args.dtype,
                       output_dir=args.outputs, preprocessors=args.preprocessors)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app.launch(host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
