"""The Gradio web UI (`cdv2 app`): `controls` (the table of controls, no gradio) and `ui` (layout
and handlers on the public `Colorizer` API)."""
