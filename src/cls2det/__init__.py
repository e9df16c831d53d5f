"""cls2det: distill image classifiers into object detectors."""

__version__ = "0.1.0"
