"""Stage 0, the catalog: takes a catalog YAML file (or a built-in name) and gives the validated
`Catalog` of sub-datasets, one partition each (`loading.load_catalog`).

`model` holds the entry and its blocks, built from `fields`; `rules` the scale, label and split
rules that `labels` and `splits` apply to a source's images (label tables read by `xlsx` where
they are workbooks); `sources` validates the `source:` block; `validation` words every problem
in the catalog's terms; `cache` keeps validated entries for the next process.
"""
