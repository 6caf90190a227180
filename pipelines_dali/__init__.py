"""All NVIDIA DALI code of fast_ressl: augmentations (augment.py), pipelines (pipeline.py), loaders
handing torch tensors to the trainer (loader.py) and webdataset index files (webdataset.py).
Nothing outside this package imports DALI."""
