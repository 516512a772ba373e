"""Layer tests refuse implicit transfers between host (numpy) memory and devices, as big_vision's
training does with ``jax.transfer_guard("disallow")``: every such move inside the ops must be an explicit
``device_put``/``device_get``. Device-to-device moves stay allowed: the transpose of an explicit
``device_put`` (a cotangent sent back where its primal lives) is one, made by JAX's autodiff."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _explicit_transfers_only():
    with jax.transfer_guard_host_to_device("disallow"), jax.transfer_guard_device_to_host("disallow"):
        yield
