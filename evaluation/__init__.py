"""cladapt.evaluation: scoring models on held-out data, the accuracy matrix the registry records, the
continual-learning metrics, the admission gate and the report.

Training calls evaluation (``cladapt.train`` -> ``cladapt.evaluation``), never the reverse: a run hands
over a :class:`~cladapt.evaluation.history_eval.TrainedModel` and gets back the evaluation row and an
:class:`~cladapt.evaluation.gate.Admission`. Modules:

* :mod:`~cladapt.evaluation.scoring`: exact match / format rate / ROUGE-L of generations (``evaluate``);
* :mod:`~cladapt.evaluation.label_scores`: constrained (label log-likelihood) scoring;
* :mod:`~cladapt.evaluation.general_text`: general perplexity;
* :mod:`~cladapt.evaluation.history_eval`: a new version scored on every task the registry knows;
* :mod:`~cladapt.evaluation.training_curves`: ``--eval-every`` curves and the stability gap;
* :mod:`~cladapt.evaluation.accuracy_matrix` and :mod:`~cladapt.evaluation.metrics`: the recorded
  ``R`` matrix and AA / BWT / FWT / forgetting;
* :mod:`~cladapt.evaluation.gate`: the policy that admits or rejects a version;
* :mod:`~cladapt.evaluation.report`: the HTML/PNG report.
"""

from cladapt.evaluation.general_text import general_texts, perplexity
from cladapt.evaluation.label_scores import label_logprobs
from cladapt.evaluation.scoring import EvalResult, EvalSet, eval_set_from_examples, evaluate, load_eval_set, rule

__all__ = [
    "EvalResult",
    "EvalSet",
    "eval_set_from_examples",
    "evaluate",
    "general_texts",
    "label_logprobs",
    "load_eval_set",
    "perplexity",
    "rule",
]
