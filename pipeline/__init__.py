"""nps.pipeline."""
__version__ = "0.1.0"
from nps.pipeline.results.export import load_subnetwork  # noqa: E402,F401
