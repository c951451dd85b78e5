"""One-off studies behind a default (not part of `facemark bench`): `box_noise` (how calibrated Haar boxes
deviate from landmark boxes: the numbers of train's --detector-boxes jitter) and `interference` (why the bench
times every variant in a worker process of its own). Run with `python -m facemark.benchmarks.studies.NAME`."""
