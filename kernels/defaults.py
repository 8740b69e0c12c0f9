"""The samplers' defaults, apart from the kernels so that the CLI shows them without importing numpy or numba."""

DEFAULT_DELTA = 0.002  # the paper's tolerance: |c - target| <= delta
DEFAULT_R = 0.95  # the largest pruning ratio of a group
