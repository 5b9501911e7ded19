"""Stage 4, training data: takes the tiles and their records and gives CPIA-Mini (`mini`, keeping
evaluation images out by `exclusions`), the data variants of Table II (`variants`) as WebDataset
shards (`shards`), the training stream over either layout (`datasets`), and pre-training and
evaluation (`ssl`). `datasets` and `ssl` import torch; the Dagster definitions never load them.
"""
