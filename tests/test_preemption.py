"""SIGTERM handling inside Ray Train workers (cluster/preemption.py), as units: while a training loop
runs, Ray's exit is deferred and the loop is told; otherwise Ray's handler runs as before. The
whole path (a real worker SIGTERMed, every rank checkpointing that step, Ray resuming from it) is
tests/test_resume.py::test_ray_survives_a_node_preemption_and_a_sigterm."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from cluster import preemption


@pytest.fixture
def ray_handler_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(preemption, "_thread", type("T", (), {"interrupt_main": staticmethod(lambda s: None)}))
    return calls


def test_sigterm_during_training_sets_the_flag_instead_of_exiting(ray_handler_calls: list[int]) -> None:
    handler = preemption._deferring(lambda signum, frame: ray_handler_calls.append(signum))
    with preemption.training_active(grace_s=60):
        assert not preemption.sigterm_requested()
        handler(signal.SIGTERM, None)
        assert preemption.sigterm_requested() and ray_handler_calls == []
        handler(signal.SIGTERM, None)  # a second SIGTERM (or the grace timer) lets Ray exit after all
        assert ray_handler_calls == [signal.SIGTERM]


def test_sigterm_outside_training_is_rays(ray_handler_calls: list[int]) -> None:
    handler = preemption._deferring(lambda signum, frame: ray_handler_calls.append(signum))
    handler(signal.SIGTERM, None)
    assert ray_handler_calls == [signal.SIGTERM] and not preemption.sigterm_requested()


def test_the_setup_hook_wraps_the_handler_ray_installs(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.utils as ray_utils

    installed: list[Any] = []
    monkeypatch.setattr(ray_utils, "set_sigterm_handler", lambda h: installed.append(h))
    preemption.defer_sigterm()
    preemption.defer_sigterm()  # idempotent
    ray_utils.set_sigterm_handler(lambda signum, frame: None)
    assert len(installed) == 1 and installed[0].__qualname__ == "_deferring.<locals>.handler"
