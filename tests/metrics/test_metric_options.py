"""``spobench eval --option METRIC.KEY=VALUE``: parsed once, typed by the metric's ``Options`` schema."""

import pytest

from spobench.core.errors import InputError
from spobench.eval.evaluate import check_options
from spobench.metrics.base import parse_option_items
from spobench.metrics.hpsv3 import HPSv3
from spobench.metrics.toy import ToyAesthetic


def test_items_group_by_metric():
    assert parse_option_items(["hpsv3.batch_size=4", "hpsv3.dtype=bf16 ", "x.y="]) == {
        "hpsv3": {"batch_size": "4", "dtype": "bf16 "}, "x": {"y": ""}}
    for bad in ("hpsv3", "hpsv3=4", ".batch_size=4", "hpsv3.=4"):
        with pytest.raises(InputError, match="expected METRIC.KEY=VALUE"):
            parse_option_items([bad])


def test_options_are_typed_and_checked_per_metric():
    classes = {"hpsv3": HPSv3, "toy_aesthetic": ToyAesthetic}
    assert check_options({"hpsv3": {"batch_size": "4", "allow_cpu": "true"}}, classes) == {
        "hpsv3": {"dtype": None, "batch_size": 4, "allow_cpu": True}}
    with pytest.raises(InputError, match="metric 'toy_aesthetic' takes no options"):
        check_options({"toy_aesthetic": {"batch_size": "4"}}, classes)
    with pytest.raises(InputError, match="'hpsv2' is not one of the metrics being scored.*did you mean 'hpsv3'"):
        check_options({"hpsv2": {"batch_size": "4"}}, classes)
    with pytest.raises(InputError, match="--option hpsv3: hpsv3 setting 'dtype' must be one of"):
        check_options({"hpsv3": {"dtype": "fp64"}}, classes)
