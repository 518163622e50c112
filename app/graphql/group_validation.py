"""GraphQL types of validation reports (app/group_validation.py)."""

from __future__ import annotations

from datetime import datetime

import strawberry

from app import group_validation, models

strawberry.enum(
    models.ValidationStatus,
    name="ValidationStatus",
    description="VALID: every slice present and intact. INVALID: see the problems.",
)


@strawberry.type
class ValidationProblem:
    slice_index: int | None
    code: str = strawberry.field(
        description="MISSING_SLICE, MISSING_OBJECT, SIZE_MISMATCH, CHECKSUM_MISMATCH, NOT_A_PNG, "
        "DIMENSION_MISMATCH, BAD_PIXEL_MODE"
    )
    message: str


@strawberry.type
class ValidationReport:
    status: models.ValidationStatus
    checked_at: datetime
    problems: list[ValidationProblem] = strawberry.field(
        description="ordered by slice; at most the first 1000 (problemCount counts them all)"
    )
    problem_count: int

    @classmethod
    def from_report(cls, report: group_validation.ValidationReport) -> ValidationReport:
        return cls(
            status=report.status,
            checked_at=report.checked_at,
            problems=[
                ValidationProblem(
                    slice_index=problem.slice_index, code=problem.code, message=problem.message
                )
                for problem in report.problems
            ],
            problem_count=report.problem_count,
        )
