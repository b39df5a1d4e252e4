"""Evaluation (the paper's §5 protocol): image metrics, FID InceptionV3, CLIP similarity, TPS-deformed
references; `python -m cdv2.eval`."""
