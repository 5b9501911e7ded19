"""Stage 2a, whole-slide images: takes a WSI sub-dataset's slides under `raw/<key>/` and gives
standardized pyramidal TIFFs at one MPP and the XL/L/M/S tiles cut from them, with their records.

`slides` (and `dicom`) open slides and resolve their MPP; `standardize` turns one slide into its
TIFF (`resample` plans and filters, `pyramid` writes, `settings` configures) and `slide_jobs`
runs a partition's slides resumably; `tiling` cuts one slide's tiles (`tissue` decides what is
kept) and `tile_jobs` runs a partition; `fused` does both in one pass; `thumbnails` draws the
UI's slide thumbnails.
"""
