"""Teachers: one Protocol (``base.Teacher``), one module per kind. ``make_teacher`` is a plain if/elif on
``spec.kind`` - no registry. Heavy kinds are imported lazily (``local`` pulls in torch). ``ledger`` records
every call (cost, cache) for whoever made it: the labeller, the service, the judge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill.errors import DistillError
from distill.task import TeacherSpec
from distill.teachers.base import NoAnswer, Teacher, TeacherAuthError, TeacherReply, TeacherRequest, TeacherUnavailable

if TYPE_CHECKING:
    from distill.project import Project
    from distill.ratelimit import Limiter

__all__ = ["make_teacher", "NoAnswer", "Teacher", "TeacherAuthError", "TeacherReply", "TeacherRequest",
           "TeacherUnavailable"]


def make_teacher(spec: TeacherSpec, project: "Project", limiter: "Limiter | None" = None) -> Teacher:
    """Build the teacher ``spec`` describes. ``limiter`` (RPM/TPM) applies to HTTP teachers, which acquire
    it before every attempt; in-process teachers have no provider limit to respect."""
    if spec.kind == "openai":
        from distill.teachers.openai_compat import OpenAITeacher

        return OpenAITeacher(spec, project, limiter)
    elif spec.kind == "local":
        from distill.teachers.local import LocalTeacher

        return LocalTeacher(spec, project)
    elif spec.kind == "replay":
        from distill.teachers.replay import ReplayTeacher

        return ReplayTeacher(spec, project)
    elif spec.kind == "ensemble":
        raise DistillError(
            f"teacher '{spec.name}' is an ensemble: it has no model of its own",
            hint="label with it via `distill label` (which labels with each member, then combines)",
        )
    raise DistillError(f"teacher '{spec.name}': unknown kind '{spec.kind}'")  # pragma: no cover (pydantic checks)

