"""The hostile user's tests share the API tests' users, clients and tiny files."""

from tests.api.conftest import (  # noqa: F401 - pytest finds fixtures by the names imported here
    _isolated,
    anon_client,
    broker_redis,
    client_for,
    make_dataset,
    make_experiment,
    other,
    other_client,
    owner,
    owner_client,
    owner_token,
    token_client,
)
