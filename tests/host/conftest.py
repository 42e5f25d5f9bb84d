"""Fixtures shared by the emulator's tests."""

import secrets

import pytest

from emulator_fixtures import make_cert_pem
from tbsdk import SdkRunner, sdk_venv_problem


@pytest.fixture
def secret() -> str:
    """The profiles' provision secret, made up for this test."""
    return secrets.token_hex(10)


@pytest.fixture
def cert_pem() -> str:
    """The pre-provisioned X.509 device's certificate."""
    return make_cert_pem("pre-x509")


@pytest.fixture(scope="session")
def tb_sdk() -> SdkRunner:
    """Runs tests/host/tbsdk_scripts/* with the official ThingsBoard SDK (see tbsdk.py)."""
    problem = sdk_venv_problem()
    if problem:
        pytest.fail(problem)
    return SdkRunner()
