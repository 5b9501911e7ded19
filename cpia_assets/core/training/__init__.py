"""Stage 4, training data: takes the tiles and their records and gives CPIA-Mini (`mini`, its
sampling in `mini_sampling`), the data variants of Table II (`variants`) as WebDataset shards
(`shards`), both holding evaluation data out by one rule (`exclusions`), the training stream
over either layout (`datasets`), and pre-training and evaluation (`ssl`). `lineage` traces
a Mini image or a shard sample back to its source file; `plan` sizes a build before any
download. `datasets` and the training in `ssl` import torch; the
Dagster definitions never load them.
"""
