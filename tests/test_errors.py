"""Every error Paceline raises has one root, so a caller (and the CLI) can tell a user's mistake from a bug."""

import importlib
import inspect
import pkgutil

import pytest

import assets
import paceline
import pipeline
import resources
from paceline.components import YamlDeclarationError
from pipeline.errors import ConfigError, PacelineError
from pipeline.items import ItemsError
from pipeline.limits import LimitError
from pipeline.workloads.common import WorkloadConfigError

# The bundled local services are stand-ins for other people's servers, run as their own processes:
# their errors are a server's, not Paceline's.
NOT_PACELINE = ("pipeline.localservices",)


def _paceline_modules():
    for package in (pipeline, assets, resources, paceline):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.startswith(NOT_PACELINE):
                yield importlib.import_module(info.name)


def _exceptions_defined_in(module):
    for _, value in inspect.getmembers(module, inspect.isclass):
        if issubclass(value, BaseException) and value.__module__ == module.__name__:
            yield value


@pytest.mark.parametrize("module", list(_paceline_modules()), ids=lambda module: module.__name__)
def test_every_exception_paceline_defines_is_a_paceline_error(module):
    for error in _exceptions_defined_in(module):
        assert issubclass(error, PacelineError), f"{module.__name__}.{error.__name__} must derive from PacelineError"


def test_the_check_sees_the_exceptions_it_judges():
    found = {error.__name__ for module in _paceline_modules() for error in _exceptions_defined_in(module)}
    assert {
        "LimitError",
        "ManifestError",
        "OutOfCredit",
        "Throttled",
        "ConnectionLost",
        "YamlDeclarationError",
    } <= found


@pytest.mark.parametrize("error", [LimitError, ItemsError, WorkloadConfigError, YamlDeclarationError])
def test_a_bad_declaration_is_a_config_error_and_still_a_value_error(error):
    # Pydantic (Dagster's config) turns a ValueError raised in a validator into a config error naming the field.
    assert issubclass(error, ConfigError) and issubclass(error, ValueError)
