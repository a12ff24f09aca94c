"""lookahead-ray: LookAhead Tuning (arXiv 2503.19041) on Ray Data, Ray Train + DeepSpeed and Ray Tune."""

__version__ = "0.1.0"
