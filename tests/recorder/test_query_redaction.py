"""Secrets in query strings: redacted in storage and in the access log, whole upstream."""

from __future__ import annotations

import logging
from urllib.parse import unquote

import aiohttp
import pytest
from yarl import URL

from shadowproxy.logs import JsonFormatter, TextFormatter
from shadowproxy.recorder.query import QueryRedactor
from tests.conftest import StartProxy, route
from tests.db import fetch
from tests.upstreams import model, serve

QUERY = ("api_key=SECRET123&x=1&Token=tok%20SECRET&%61ccess_token=SECRET9&KEY=SECRET7"
         "&sig&X-Amz-Signature=SECRETsig&keep=key")


@pytest.mark.parametrize(("configured", "stored"), [
    (None, "api_key=[redacted]&x=1&Token=[redacted]&%61ccess_token=[redacted]&KEY=[redacted]"
           "&sig&X-Amz-Signature=[redacted]&keep=key"),
    (["keep"], QUERY.replace("keep=key", "keep=[redacted]")),
    ([], QUERY),
], ids=["default list", "own list", "none"])
async def test_secret_query_parameters_are_redacted_in_storage_and_logs(
        start_proxy: StartProxy, database_url: str, caplog: pytest.LogCaptureFixture,
        configured: list[str] | None, stored: str) -> None:
    """With the default `recording.redact_query`, the values of api_key, token, key,
    signatures (any case, also percent-encoded names) are stored and logged as
    "[redacted]" while the primary and the shadow get the query as sent; an own list
    replaces the default, an empty one redacts nothing."""
    caplog.set_level(logging.INFO, logger="shadowproxy.access")
    recording = {} if configured is None else {"redact_query": configured}
    async with serve(model("v1")) as primary, serve(model("v2")) as shadow, \
            start_proxy([route(primary.url, shadow.url)], recording=recording,
                        access_log=True) as proxy, aiohttp.ClientSession() as http:
        url = URL(f"http://127.0.0.1:{proxy.port}/p?{QUERY}", encoded=True)
        assert (await http.post(url, json={})).status == 200
    # (The test upstreams see the query percent-decoded.)
    assert primary.seen[0].query == shadow.seen[0].query == unquote(QUERY)
    rows = await fetch(database_url, "SELECT query FROM shadowproxy.requests")
    assert [r["query"] for r in rows] == [stored]
    access = [r for r in caplog.records if r.name == "shadowproxy.access"]
    assert len(access) == 1
    for line in (JsonFormatter().format(access[0]), TextFormatter().format(access[0])):
        assert stored in line
        if configured is None:
            assert "SECRET" not in line


def test_a_bare_name_or_a_name_inside_a_value_is_left_alone() -> None:
    """Only a listed parameter's value is replaced: a bare flag, a listed name appearing as
    a value or inside another name, and an empty query are kept as they are."""
    redact = QueryRedactor(["token"])
    assert redact("") == ""
    assert redact("token") == "token"
    assert redact("q=token&mytoken=1&token_type=x") == "q=token&mytoken=1&token_type=x"
    assert redact("a=1&TOKEN=&token=x=y") == "a=1&TOKEN=[redacted]&token=[redacted]"


def test_semicolon_separators_and_bracket_names_are_redacted() -> None:
    """A parameter after ``;`` (a separator to some servers) and the bracket notation of
    Rack, PHP and Rails (``name[]``, ``name[0]``, ``outer[name]``, also percent-encoded)
    are redacted; the separators and the other parameters are kept byte for byte."""
    redact = QueryRedactor(["api_key", "password"])
    assert redact("a=1;api_key=S1;b=2&c=3") == "a=1;api_key=[redacted];b=2&c=3"
    assert redact("api_key[]=S1&api_key[]=S2&x[]=1") == (
        "api_key[]=[redacted]&api_key[]=[redacted]&x[]=1")
    assert redact("API_KEY[0]=S&user[name]=ann&user[password]=S") == (
        "API_KEY[0]=[redacted]&user[name]=ann&user[password]=[redacted]")
    assert redact("user%5Bpassword%5D=S;q=a[b]") == "user%5Bpassword%5D=[redacted];q=a[b]"
    assert redact("api_keys[]=1&my[api_key_x]=2;;") == "api_keys[]=1&my[api_key_x]=2;;"
