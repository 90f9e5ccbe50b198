"""rendering.states_of keeps each settled counter's parse (cid -> Applied) between settles:
a reload that changes or removes the budget must show in the next answer all the same."""

from __future__ import annotations

from sidecar import rendering
from sidecar.resolution import Snapshot
from tests.conftest import make_config

CID = "team/team%2F1/d20260101"  # an escaped entity: the parse unquotes it


def snapshot(name: str, *, with_team: bool = True) -> Snapshot:
    budgets = [
        {"id": "org", "name": "Org", "scope": "organization", "limit_usd": 5, "period": "monthly"}
    ]
    if with_team:
        budgets.append(
            {"id": "team", "name": name, "scope": "team", "limit_usd": 10, "period": "daily"}
        )
    return Snapshot.of(make_config({"budgets": budgets}))


def test_a_reload_that_renames_or_removes_the_budget_shows_at_once() -> None:
    old = snapshot("Old name")
    (state,) = rendering.states_of(old, [CID], [1_000_000, 0])
    assert (state.budget_name, state.entity, state.used_usd) == ("Old name", "team/1", 1.0)
    (again,) = rendering.states_of(old, [CID], [2_000_000, 500_000])  # from the cache
    assert (again.budget_name, again.used_usd, again.held_usd) == ("Old name", 2.0, 0.5)
    (renamed,) = rendering.states_of(snapshot("New name"), [CID], [2_000_000, 0])
    assert (renamed.budget_name, renamed.limit_usd) == ("New name", 10.0)
    assert rendering.states_of(snapshot("x", with_team=False), [CID], [1, 0]) == []


def test_the_cache_stays_bounded() -> None:
    snap = snapshot("T")
    for i in range(rendering._APPLIED_MAX + 10):
        rendering.states_of(snap, [f"team/t{i}/d20260101"], [0, 0])
        assert len(rendering._APPLIED) <= rendering._APPLIED_MAX
