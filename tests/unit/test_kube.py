"""Kube.request: every failure of a call comes out as an ApiError, which the callers handle."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from qlora_operator.kube import ApiError, Kube


class FailingClient:
    """An API client whose every call fails as aiohttp's client does when the API server goes away."""

    def __init__(self, error: Exception):
        self.error = error

    async def param_serialize(self, **kwargs):
        return ()

    async def call_api(self, *params, _request_timeout=None):
        raise self.error


@pytest.mark.parametrize("error", [aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut short"),
                                   ConnectionResetError("reset")])
def test_a_connection_lost_mid_call_is_an_api_error(error):
    with pytest.raises(ApiError) as raised:
        asyncio.run(Kube(FailingClient(error)).request("GET", "/api/v1/pods"))
    assert raised.value.status == 0 and raised.value.transient
