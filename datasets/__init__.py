"""nps.datasets."""
