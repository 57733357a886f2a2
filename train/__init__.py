"""cladapt.train: data -> trainer (+ method and plugins) -> one committed registry version.

Entry point: :func:`cladapt.train.run.train_from_config` (``cladapt train``, ``cladapt forget``,
``bench cl``) around its core :func:`cladapt.train.run.train_task`. A run is scored and gated by
:mod:`cladapt.evaluation` (wired in :mod:`cladapt.train.evaluation_hooks`); training never imports
``cladapt.serve``, and evaluation uses nothing of training but its data loader.
Data transforms and loss plugins (ASD, GeRe replay, continual-evaluation curves) are selected by
the config in :mod:`cladapt.train.extensions`.
"""
