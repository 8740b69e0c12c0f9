"""nps.kernels."""
