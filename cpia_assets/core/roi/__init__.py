"""Stage 2b, region-of-interest images: takes a ROI sub-dataset's images under `raw/<key>/`
(HDF5 patch arrays are first unpacked by `patch_arrays`) and gives 384 x 384 JPEGs in the scale
folder the catalog assigns, with label and split (`standardize`; one image in `images`).
"""
