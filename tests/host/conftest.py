"""Fixtures shared by the emulator's HTTP and CoAP tests."""

import secrets

import pytest

from emulator_fixtures import make_cert_pem


@pytest.fixture
def secret() -> str:
    """The profiles' provision secret, made up for this test."""
    return secrets.token_hex(10)


@pytest.fixture
def cert_pem() -> str:
    """The pre-provisioned X.509 device's certificate."""
    return make_cert_pem("pre-x509")
