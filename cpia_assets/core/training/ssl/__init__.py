"""Self-supervised pre-training (MAE, MoCo-v3, DINO on timm ViTs) and downstream evaluation.

Every module here imports torch; nothing here imports Dagster. The Dagster asset starts
`cpia_assets.defs.ssl_child` (this package's `train` entry point reporting through Dagster Pipes;
or it under torchrun) as a child process and reads its outputs.
"""
