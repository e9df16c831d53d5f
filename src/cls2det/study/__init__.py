"""Studies: a grid of training runs (detectors x rows x seeds) sharing data, teacher and schedule, and its report;
the demo study; the backbone pre-training that stands in for ImageNet offline."""
