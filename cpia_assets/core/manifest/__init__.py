"""Stage 3, the manifest: takes every partition's Parquet records (`manifests/<key>/`) and gives
`manifest.duckdb`, loaded incrementally by one writer (`loading`; its tables and views in
`tables`, connections in `database`), the queries behind the `cpia` CLI (`queries`), the asset
checks (`integrity`), Table I beside the paper's numbers (`paper_table_i`), the sample
mosaic (`mosaic`) and the near-duplicate search of leak audits (`leaks`).
"""
