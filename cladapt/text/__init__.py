"""Text in and out of a model, below training, evaluation and serving: the chat template
(:mod:`~cladapt.text.template`), the one batched generation loop (:mod:`~cladapt.text.generation`)
and the plain-text reader (:mod:`~cladapt.text.texts`). Import the modules themselves: this package
imports nothing, so rendering a prompt does not load torch."""
