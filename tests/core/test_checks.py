"""spobench.core.checks: the one finiteness/range check and the one device parser."""

import math

import pytest

from spobench.core.checks import check_number, number_problem, parse_device, tiny_clip_problem
from spobench.core.errors import InputError


@pytest.mark.parametrize("value, bounds, problem", [
    (float("nan"), {"gt": 0}, "must be a finite number (got nan)"),  # nan <= 0 is False: a plain check passes it
    (float("inf"), {"min": 0}, "must be a finite number (got inf)"),
    (-math.inf, {}, "must be a finite number (got -inf)"),
    (-1.0, {"gt": 0}, "must be > 0 (got -1.0)"),
    (1, {"lt": 1}, "must be < 1 (got 1)"),
    (3, {"max": 2}, "must be <= 2 (got 3)"),
    (0, {"min": 1}, "must be >= 1 (got 0)"),
])
def test_number_problems(value, bounds, problem):
    assert number_problem(value, **bounds) == problem
    with pytest.raises(InputError, match="^--x " + problem.replace("(", r"\(").replace(")", r"\)") + "$"):
        check_number("--x", value, **bounds)


@pytest.mark.parametrize("value", [0.5, 1, None, "text", True])
def test_fine_values_and_non_numbers_pass(value):
    assert number_problem(value, min=0, max=1) is None
    assert check_number("--x", value, min=0, max=1) is value


def test_devices(monkeypatch):
    import torch

    assert parse_device("cpu") == "cpu" and parse_device(" cpu ") == "cpu"
    assert parse_device("auto", allow_auto=True) == "auto"
    for bad, match in [("gpu0", "not a device"), ("auto", "not a device"), ("cuda:x", "not a device"),
                       ("CUDA", "not a device"), ("cpu:1", "there is one CPU device"), ("", "not a device")]:
        with pytest.raises(InputError, match=f"^--device {bad!r}: {match}"):
            parse_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available on this machine"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda") == "cuda" and parse_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"--device 'cuda:2': this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        parse_device("cuda:2")


def test_tiny_clip_shape():
    assert tiny_clip_problem(hidden=64, patch=4) == []
    assert [k for k, _ in tiny_clip_problem(hidden=10, patch=64)] == ["patch", "hidden"]
    assert tiny_clip_problem(hidden=64, patch=32) == []  # one patch covering the image is still a model
