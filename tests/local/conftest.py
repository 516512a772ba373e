"""The training tests' tiny generated tile store, for the local mode's loop tests."""

from tests.train.conftest import store  # noqa: F401  (a session fixture)
