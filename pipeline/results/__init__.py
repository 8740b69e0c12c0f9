"""results: the results file (its reader, its one writer, its format), the analysis, the report and the table.

No torch here: the tools that load and run networks (export, verify, ONNX, latency) are :mod:`nps.pipeline.deploy`.

``nps.pipeline.results.load(path)`` (a results file as a pandas DataFrame, one row per subnetwork:
:mod:`nps.pipeline.results.table`) is imported on first use, so that importing this package stays cheap.
"""


def __getattr__(name: str):
    if name == "load":
        from nps.pipeline.results.table import load

        return load
    raise AttributeError(f"module 'nps.pipeline.results' has no attribute {name!r}")
