"""tests/unit: pure tensor math. Starting Ray here is a bug, so ray.init raises."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tests/unit must not start Ray; move the test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
