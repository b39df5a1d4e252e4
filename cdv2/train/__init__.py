"""Training: the grain input pipeline (`data`, `collate`), batch augmentations (`augment`) and a
synthetic dataset in the authors' layout (`synthetic`)."""
