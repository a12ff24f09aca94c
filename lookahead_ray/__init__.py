"""lookahead-ray: LookAhead Tuning (arXiv 2503.19041) on Ray Data, Ray Train + DeepSpeed and Ray Tune."""

from importlib import metadata

try:
    __version__ = metadata.version("lookahead-ray")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
