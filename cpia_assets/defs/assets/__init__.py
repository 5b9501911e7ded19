"""Asset factories, one module per pipeline stage as in `core/`: `downloads` (source_files,
raw_download), `standardize` and `tiles` (standardized_wsi and scale_tiles, over `core/wsi` and
`core/roi`), `manifest` (tile_manifest and its checks), `training` (cpia_mini, training_shards)
and `ssl` (ssl_checkpoint, downstream_eval). Each takes the active catalog's partitions."""
