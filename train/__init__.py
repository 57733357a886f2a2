"""cladapt.train: data -> trainer (+ method and plugins) -> one committed registry version.

Entry point: :func:`cladapt.train.run.train_from_config` (``cladapt train``, ``cladapt forget``,
``bench cl``) around its core :func:`cladapt.train.run.train_task`, and the evaluation helpers in
:mod:`cladapt.train.evaluate` / :mod:`cladapt.train.gate` / :mod:`cladapt.train.bench_cl`.
Data transforms and loss plugins (ASD, GeRe replay, continual-evaluation curves) are selected by
the config in :mod:`cladapt.train.extensions`.
"""
