"""The Prefect release flow on Prefect's test server: a straight promotion, and one that waits
for a person's approval (paused, then resumed with input) before moving the alias."""

from __future__ import annotations

import threading
import time

import pytest

import mlflow
from flows.release import release_flow
from tests.test_promote import CHAMPION, _aliases, _model, _version


def test_release_promotes_and_rolls_back(prefect_server) -> None:
    name = _model()
    v1, v2 = _version(name, 0.5), _version(name, 0.6)
    assert release_flow(name, v1)["promoted"] is True
    assert release_flow(name, v2, reason="better colours")["promoted"] is True
    assert _aliases(name)[CHAMPION] == v2
    assert release_flow(name, rollback=True) == {"from": v2, "to": v1}
    assert _aliases(name)[CHAMPION] == v1


def test_release_waits_for_approval(prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.flow_runs import resume_flow_run

    name = _model()
    v1 = _version(name, 0.5)
    result: dict = {}
    run_name = f"approve-{name}"
    flow = release_flow.with_options(flow_run_name=run_name)
    worker = threading.Thread(target=lambda: result.update(flow(name, v1, approval=True)))
    worker.start()
    paused = None
    with get_client(sync_client=True) as client:
        for _ in range(120):
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[run_name])))
            if runs and runs[0].state and runs[0].state.is_paused():
                paused = runs[0]
                break
            time.sleep(0.5)
    assert paused is not None, "the release flow never paused for approval"
    assert CHAMPION not in _aliases(name)  # nothing moves before approval
    resume_flow_run(paused.id, run_input={"approve": True, "reason": "looks good"})
    worker.join(timeout=120)
    assert result["promoted"] is True and _aliases(name)[CHAMPION] == v1
    tags = mlflow.MlflowClient().get_model_version(name, v1).tags
    assert tags["lens.promotion_reason"] == "looks good"


def test_release_with_approval_stops_before_pausing_on_a_failing_version(prefect_server) -> None:
    from tasks.promote import PromotionError

    name = _model()
    v1 = _version(name, 0.1)  # under the 0.3 minimum
    with pytest.raises(PromotionError, match="overall 0.100 is 0.200 under the minimum"):
        release_flow(name, v1, approval=True, timeout_s=5)
    assert CHAMPION not in _aliases(name)
