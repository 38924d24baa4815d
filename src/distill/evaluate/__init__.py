"""`distill eval`: the student against its teacher, gold and a baseline on the locked test split, with a gate.

- ``evaluate.classify.evaluate``  classify students (encoder classifiers)
- ``evaluate.lm.evaluate_lm``     extract / generate students (causal LMs)
- ``evaluate.common``             what both share: test table, CIs, gate, headline, cost, writing the result
- ``evaluate_project``            the one call the CLI and iterate make: dispatch by the project's kind
"""

from __future__ import annotations

from distill.evaluate.classify import EvalResult, evaluate
from distill.evaluate.lm import evaluate_lm


def evaluate_project(project, *, model_path: str | None = None, teacher: str | None = None,
                     cpu_hour_usd: float = 0.10, latency_samples: int = 200, max_new_tokens: int | None = None,
                     limit: int | None = None, base: bool = True, progress: bool = True) -> dict:
    """Evaluate ``model_path`` (default: the latest trained model) by the project's kind; the result dict."""
    if project.spec.kind == "classify":
        return evaluate(project, model_path=model_path, teacher=teacher, cpu_hour_usd=cpu_hour_usd,
                        latency_samples=latency_samples, progress=progress).to_dict()
    return evaluate_lm(project, model_path=model_path, teacher=teacher, max_new_tokens=max_new_tokens, limit=limit,
                       cpu_hour_usd=cpu_hour_usd, base=base, progress=progress)


__all__ = ["EvalResult", "evaluate", "evaluate_lm", "evaluate_project"]
