"""``spinenet cohort``: every study under a folder, run once each on a Dask cluster, resumably.

* :mod:`~SpineNetLib.cohort.discover` finds the studies (image files and sagittal DICOM series);
* :mod:`~SpineNetLib.cohort.run` runs them on Dask (a local cluster or an existing scheduler),
  each through :func:`SpineNetLib.pipeline.run` and :func:`SpineNetLib.outputs.files.write_results`
  like ``spinenet run``;
* :mod:`~SpineNetLib.cohort.tables` gathers the finished studies into the cohort CSV files.
"""
