"""Self-supervised pre-training (MAE, MoCo-v3, DINO on timm ViTs) and downstream evaluation.

Every module here imports torch; nothing here imports Dagster. The Dagster assets start
`python -m cpia_assets.core.ssl.train` (or torchrun) as a child process and read its outputs.
"""
