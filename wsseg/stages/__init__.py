"""Pipeline stages: plain functions (paths and configs in, paths and metrics out) that work without a run,
and `self_training`, the U-Net stage of a run. The other stage objects live in `wsseg.pipeline`."""
