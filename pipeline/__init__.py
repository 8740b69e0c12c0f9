"""nps.pipeline: the pipeline of network pruning spaces (see the README's layout table for its layers).

``nps.pipeline.load_subnetwork`` (an exported subnetwork back as an ``nn.Module``) is imported on first use, so that
``import nps.pipeline`` (and the ``nps`` command's ``--help``) stays instant.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_subnetwork":
        from nps.pipeline.deploy.export import load_subnetwork

        return load_subnetwork
    raise AttributeError(f"module 'nps.pipeline' has no attribute {name!r}")
