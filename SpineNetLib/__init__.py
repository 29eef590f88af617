"""SpineNetLib: SpineNetV2 vertebra detection, labelling and disc grading, without Slicer.

The whole pipeline in three calls::

    import SpineNetLib
    from SpineNetLib.inputs.load import load_scan

    scan = load_scan("path/to/dicom_folder")
    networks = SpineNetLib.load_networks("bundled", with_grading=True)
    result = SpineNetLib.run(scan, networks)           # a pipeline.RunResult; writes nothing
    SpineNetLib.write_results("out", result, scan=scan)  # JSON + CSV, hotspots, preview.png, result.json

Those names are loaded on first use, so that importing a light module (e.g.
``SpineNetLib.outputs.documents`` in Slicer before torch is installed) does
not import torch.
"""

__version__ = "0.1.0"

_PIPELINE_NAMES = ("run", "load_networks", "RunOptions", "RunResult")


def __getattr__(name: str):
    """The lazily exported names (module docstring)."""
    if name in _PIPELINE_NAMES:
        from SpineNetLib import pipeline

        return getattr(pipeline, name)
    if name == "write_results":
        from SpineNetLib.outputs.files import write_results

        return write_results
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
