"""The release flow: gate a registered version and promote it to ``champion``, optionally
after a person approves in the Prefect UI; or roll ``champion`` back.

    lens promote NAME VERSION [--dry-run]      the same gates from the command line
    lens promote NAME --rollback
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from tasks.release_tasks import promote_task, rollback_task


class Approval(RunInput):
    """What the approver answers when the flow pauses."""

    approve: bool
    reason: str = ""


@flow(name="lens-release", version="1", log_prints=True)
def release_flow(name: str, version: str | None = None, approval: bool = False,
                 rollback: bool = False, reason: str = "", timeout_s: int = 3600
                 ) -> dict[str, Any]:
    """Promote ``version`` of model ``name`` through its gates, or roll back."""
    if rollback:
        return rollback_task(name, reason)
    if version is None:
        raise ValueError("release_flow needs version (or rollback=True)")
    gates = promote_task(name, version, dry_run=True, strict=True)
    if approval:
        get_run_logger().info(f"{name} v{version} passes its gates dry; waiting for approval "
                              f"in the Prefect UI (resume the flow run with approve=true)")
        answer = pause_flow_run(wait_for_input=Approval, timeout=timeout_s)
        if not answer.approve:
            return {"promoted": False, "reason": f"rejected: {answer.reason}", **gates}
        reason = answer.reason or reason
    return promote_task(name, version, reason=reason or "release flow", strict=True)
