"""parse_config: untrusted JSON becomes an ExperimentConfig, or a ConfigError naming the bad field."""

import pytest

from kd_core.config import parse_config
from kd_core.errors import ConfigError


def test_numbers_are_checked_and_real_values_become_floats():
    config = parse_config({"dataset": "digits", "lr": 1, "epochs": 3, "codistill": {"weight": 2}})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.codistill.weight == 2.0 and isinstance(config.codistill.weight, float)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dataset": "digits", "epochs": True}, "'epochs' must be an integer"),
        ({"dataset": "digits", "epochs": 1.5}, "'epochs' must be an integer"),
        ({"dataset": "digits", "lr": 0}, "'lr' must be >="),
        ({"dataset": "digits", "bogus": 1}, "unknown config field(s): bogus"),
        ({"dataset": "digits", "codistill": {"nope": 1}}, "unknown codistill field(s): nope"),
        ({"dataset": "digits", "codistill": {"replicas": 0}}, "'codistill.replicas' must be >= 1"),
        ({"dataset": "digits", "codistill": {"weight": "1"}}, "'codistill.weight' must be a number"),
        ({"kind": "distill", "dataset": "digits"}, "'teacher' is required"),
    ],
)
def test_bad_fields_are_named(data, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert needle in str(info.value)


def test_the_callers_dict_is_not_modified():
    codistill = {"weight": 1}
    parse_config({"dataset": "digits", "codistill": codistill})
    assert codistill == {"weight": 1} and isinstance(codistill["weight"], int)
