"""`distill train`: train the project's student, whichever kind it is.

    distill train PROJECT [--teacher NAME] [--epochs N] [--force]

One entry point for the CLI, ``distill iterate`` and ``distill demo``. It reads ``student:`` of distill.yaml
(with ``overrides`` on top), takes the project lock, and runs the recipe of the project's kind:

- classify           -> ``train_classifier.train``: an encoder + head, soft-target KD (``EncoderStudentConfig``)
- extract / generate -> ``lm_project.train_lm_project``: a causal LM with LoRA (``LMStudentConfig``)

Both return a ``TrainReport``. Both resume a killed run from its last checkpoint and return a finished
run as is (``reused=True``) unless ``force``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distill.student_config import TrainReport

if TYPE_CHECKING:
    from distill.project import Project

__all__ = ["TrainReport", "train"]


def train(project: Project, *, teacher: str | None = None, overrides: dict[str, Any] | None = None,
          force: bool = False, progress: bool = True) -> TrainReport:
    """Train (or resume, or reuse) the project's student on ``teacher``'s kept labels.

    ``overrides``: settings on top of ``student:`` (e.g. ``{"epochs": 2}``), validated like the file; a bad
    one fails here, before the lock is taken or anything is loaded."""
    config = project.spec.student_config(overrides)
    with project.exclusive("train"):
        # the recipe modules are looked up at call time: they import torch/transformers (slow), and tests
        # replace their functions to slow down or crash a run
        if project.spec.kind == "classify":
            from distill.recipes import train_classifier

            return train_classifier.train(project, teacher=teacher, config=config, force=force, progress=progress)
        from distill.recipes import lm_project

        return lm_project.train_lm_project(project, teacher=teacher, config=config, force=force, progress=progress)
