"""Self-supervised pre-training (MAE, MoCo-v3, DINO on timm ViTs) and downstream evaluation.

Training and evaluation import torch; `config` (settings and jobs), `tasks` (the labelled tasks
and their splits) and `table` (Table II) do not, so the Dagster definitions and the CLI load them
cheaply. Nothing here imports Dagster. The Dagster asset starts `cpia_assets.defs.ssl_child` (this
package's `train` entry point reporting through Dagster Pipes; or it under torchrun) as a child
process and reads its outputs.
"""
