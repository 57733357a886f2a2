"""cladapt.bench: the benchmarks as a library (``cladapt bench cl``), above train and evaluation.

:mod:`~cladapt.bench.cl` runs the continual-learning benchmark, :mod:`~cladapt.bench.cl_spec` says
what a run is, :mod:`~cladapt.bench.cell_process` runs each cell in a process of its own and
:mod:`~cladapt.bench.provenance` records where a number came from. The measurement scripts in the
repository's ``bench/`` folder call this package and the rest of the library; results go to
``bench/results``.
"""
