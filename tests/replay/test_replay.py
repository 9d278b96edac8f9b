"""``shadowproxy replay`` end to end: what is sent, what is stored, exactly once, --where."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web

from tests.db import fetch, fetchval
from tests.replay.helpers import ROUTE, answers, replay, request, store, write_config
from tests.upstreams import model, serve, unaccepting_listener

pytestmark = pytest.mark.timeout(60)


async def test_each_request_is_sent_as_recorded_and_its_answer_stored(
        database_url: str, tmp_path: Path) -> None:
    """The target gets method, path, query, headers (minus hop-by-hop, Host its own) and
    body; each answer is stored once as target 'cand', role 'replay', like a shadow's."""
    headers = [(b"Content-Type", b"application/json"), (b"Host", b"models.example"),
               (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
               (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
               (b"X-Forwarded-For", b"192.0.2.1"), (b"X-Tenant", b"acme"),
               (b"Content-Length", b"999")]
    await store(database_url, [request(i, query=f"v={i}", headers=headers) for i in range(20)])
    config = write_config(tmp_path, database_url)
    async with serve(model("cand-v3", scale=3.0)) as target:
        result = await replay(config, to=target.url)
        assert result.status == 0, result.err
        assert len(target.seen) == 20
    seen = sorted(target.seen, key=lambda s: s.query)[0]
    assert (seen.method, seen.path, seen.query) == ("POST", "/predict", "v=0")
    assert json.loads(seen.body) == {"features": {"x": 0}}
    assert seen.headers["host"] == target.url.removeprefix("http://")
    assert seen.headers["x-tenant"] == "acme"
    assert seen.headers["x-request-id"] == "req-00000"
    assert seen.headers["x-forwarded-for"] == "192.0.2.1, 10.0.0.7"
    assert seen.headers["x-forwarded-host"] == "models.example"
    assert seen.headers["content-length"] == str(len(seen.body))
    for hop in ("x-hop", "keep-alive", "te"):
        assert hop not in seen.headers
    rows = await fetch(database_url, """
        SELECT request_id, shadow_name, shadow_role, shadow_status, shadow_body_json,
               shadow_latency_ms, shadow_error_kind
        FROM shadowproxy.pairs WHERE shadow_name = 'cand' ORDER BY request_id""")
    assert len(rows) == 20
    assert {(r["shadow_role"], r["shadow_status"], r["shadow_error_kind"]) for r in rows} == {
        ("replay", 200, None)}
    assert json.loads(rows[3]["shadow_body_json"]) == {"prediction": 9.0,
                                                       "model_version": "cand-v3"}
    assert all(r["shadow_latency_ms"] > 0 for r in rows)
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 20
    assert "20 sent" in result.out and "stored    20 answers as 'cand'" in result.out


async def test_a_rerun_sends_nothing_and_force_replaces_each_answer(
        database_url: str, tmp_path: Path) -> None:
    """A second run with the same --as skips every answered request; --force sends them
    again and leaves one answer per request, the new one."""
    await store(database_url, [request(i) for i in range(10)])
    config = write_config(tmp_path, database_url)
    async with serve(model("v1")) as first, serve(model("v2")) as second:
        assert (await replay(config, to=first.url)).status == 0
        again = await replay(config, to=second.url)
        assert again.status == 0, again.err
        assert "10 already answered by 'cand': skipped" in again.out
        assert "nothing to replay" in again.out
        assert second.seen == []
        forced = await replay(config, "--force", to=second.url)
        assert forced.status == 0, forced.err
        assert len(second.seen) == 10
    assert "10 earlier answers replaced (--force)" in forced.out
    versions = await fetch(database_url, "SELECT body_json->>'model_version' AS v, count(*) "
                                         "FROM shadowproxy.responses WHERE target = 'cand' "
                                         "GROUP BY 1")
    assert [tuple(r) for r in versions] == [("v2", 10)]


async def test_force_as_a_live_shadows_name_keeps_its_recorded_answers(
        database_url: str, tmp_path: Path) -> None:
    """--force redoes replayed answers only: replayed under the name of a live shadow, the
    answers that shadow recorded stay as they are and their requests are not sent; the
    requests it did not answer are replayed (and a second --force redoes just those)."""
    await store(database_url, [request(i, shadows=["cand"] if i < 6 else [])
                               for i in range(10)])
    config = write_config(tmp_path, database_url,
                          shadows=[{"name": "cand", "url": "http://127.0.0.1:8"}])
    async with serve(model("v9")) as target:
        first = await replay(config, "--force", to=target.url)
        assert first.status == 0, first.err
        assert len(target.seen) == 4
        assert "6 answered by the live shadow 'cand': kept" in first.out
        again = await replay(config, "--force", to=target.url)
        assert again.status == 0, again.err
        assert len(target.seen) == 8
        assert "4 already answered by 'cand': redone" in again.out
    assert "4 earlier answers replaced (--force)" in again.out
    rows = await fetch(database_url, "SELECT role, count(*) FROM shadowproxy.responses "
                                     "WHERE target = 'cand' GROUP BY 1 ORDER BY 1")
    assert [tuple(r) for r in rows] == [("replay", 4), ("shadow", 6)]
    live = await fetch(database_url, "SELECT body_json->>'prediction' AS p FROM "
                                     "shadowproxy.responses WHERE role = 'shadow' "
                                     "ORDER BY (body_json->>'prediction')::int")
    assert [r["p"] for r in live] == [str(2 * i) for i in range(6)]


async def test_where_selects_requests_by_their_pairs_columns(
        database_url: str, tmp_path: Path) -> None:
    """--where filters over the pairs columns, once per request however many shadows it
    has, and also matches requests that have no shadow answer at all."""
    with_shadows = [request(i, primary_status=200 if i % 2 else 500, shadows=("a", "b"))
                    for i in range(10)]
    without = [request(100 + i, primary_status=200) for i in range(3)]
    await store(database_url, with_shadows + without)
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, "--where", "primary_status = 200 -- only the good ones",
                              to=target.url)
        assert result.status == 0, result.err
        assert len(target.seen) == 5 + 3
    stored = await fetch(database_url, """
        SELECT q.request_id FROM shadowproxy.responses r
        JOIN shadowproxy.requests q ON q.id = r.request WHERE r.target = 'cand'
        ORDER BY 1""")
    assert [r[0] for r in stored] == [f"req-{i:05d}" for i in (1, 3, 5, 7, 9, 100, 101, 102)]


@pytest.mark.parametrize(("where", "message"), [
    ("primary_stauts = 200", 'column "primary_stauts" does not exist'),
    ("primary_status", "must be type boolean"),
    ("true; DELETE FROM shadowproxy.requests", "syntax error"),
    ("nextval('sp_test_seq') > 0", "READ ONLY transaction"),
    # A placeholder took one of the replay's own values (here the route's name).
    ("route = $1", "has a parameter placeholder"),
    ("primary_status = $2", "could not determine data type of parameter $1"),
])
async def test_a_where_postgresql_rejects_is_a_usage_error_and_changes_nothing(
        database_url: str, tmp_path: Path, where: str, message: str) -> None:
    """A bad --where exits 2 naming the problem; a second statement or a write inside it is
    refused (one prepared statement, a READ ONLY transaction), and nothing is sent."""
    await store(database_url, [request(i) for i in range(3)])
    await fetchval(database_url, "CREATE SEQUENCE sp_test_seq")
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, "--where", where, to=target.url)
        assert target.seen == []
    assert result.status == 2, result.out + result.err
    assert result.err.startswith("shadowproxy: --where: ") and message in result.err
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.requests") == 3
    assert await fetchval(database_url, "SELECT last_value FROM sp_test_seq") == 1
    assert await fetchval(database_url, "SELECT is_called FROM sp_test_seq") is False


async def test_usage_errors_exit_2_before_anything_is_sent(
        database_url: str, tmp_path: Path) -> None:
    """An unknown route, --as primary, --rate with --speed, or a --since longer than a
    date can go back exit 2 with what to do."""
    config = write_config(tmp_path, database_url)
    base = ["replay", "-c", str(config), "--to", "http://127.0.0.1:9"]
    from tests.replay.helpers import cli

    cases = [
        (["--route", "nope", "--as", "c"], "--route: no route named 'nope'"),
        (["--route", ROUTE, "--as", "primary"], "--as primary"),
        (["--route", ROUTE, "--as", "c", "--rate", "5", "--speed", "2"], "not allowed with"),
        (["--route", ROUTE, "--as", "c", "--set-header", "bad header"], "--set-header"),
        (["--route", ROUTE, "--as", "c", "--set-json", "features.x=1"], "--set-json"),
        (["--route", ROUTE, "--as", "c", "--to", "http://127.0.0.1:8"], "--to URL"),
        (["--route", ROUTE, "--as", "c", "--since", "999999d"],
         "--since 999999d: the window would start before year 1"),
    ]
    for extra, message in cases:
        result = await cli(*base, *extra)
        assert result.status == 2, (extra, result.err)
        assert message in result.err, (extra, result.err)


async def test_a_target_url_with_credentials_is_refused_before_anything_is_sent(
        database_url: str, tmp_path: Path) -> None:
    """--to http://user:token@host exits 2 saying to give --set-header Authorization,
    without repeating the credentials: the user part was dropped and the target answered
    without the Authorization it needed, every answer stored as the candidate's."""
    await store(database_url, [request(0)])
    async with serve(model("c")) as target:
        to = target.url.replace("://", "://ruser:rtoken@")
        result = await replay(write_config(tmp_path, database_url), to=to)
        assert result.status == 2 and result.out == "", (result.out, result.err)
        assert ("--to: a user name or password in the URL (before '@') is never sent: no "
                "Authorization header is made of it; take it out of the URL and give the "
                "header with --set-header, e.g. --set-header 'Authorization=Bearer TOKEN'"
                ) in result.err, result.err
        assert "ruser" not in result.err and "rtoken" not in result.err
        assert target.seen == []
    assert await answers(database_url) == 0


async def test_a_refused_target_url_is_quoted_without_its_query_values(
        database_url: str, tmp_path: Path) -> None:
    """--to with a query exits 2 quoting the URL with each value as ***: an API key in it
    was printed whole."""
    result = await replay(write_config(tmp_path, database_url),
                          to="http://127.0.0.1:9/v1?api_key=RSECRET#F")
    assert result.status == 2, result.err
    assert ("--to http://127.0.0.1:9/v1?api_key=***#***: the URL must not carry a query or "
            "fragment") in result.err, result.err
    assert "RSECRET" not in result.err


HOP_BY_HOP_NAMES = ["Proxy-Authorization", "Connection", "Keep-Alive", "TE", "Trailer",
                    "Transfer-Encoding", "Upgrade", "Proxy-Connection"]


async def test_a_hop_by_hop_set_header_is_refused_as_a_shadows_set_headers_is(
        database_url: str, tmp_path: Path) -> None:
    """--set-header with a hop-by-hop name exits 2 before anything is sent, with the
    message a live shadow's set_headers gets in the config file. Proxy-Authorization,
    Keep-Alive, TE, Trailer, Upgrade and Proxy-Connection were sent to the target."""
    from tests.replay.helpers import cli

    await store(database_url, [request(0)])
    async with serve(model("c")) as target:
        for name in HOP_BY_HOP_NAMES:
            result = await replay(write_config(tmp_path, database_url), "--set-header",
                                  f"{name}=x", to=target.url)
            assert result.status == 2 and result.out == "", (name, result.out, result.err)
            assert (f"--set-header {name} is a hop-by-hop header (RFC 9110 §7.6.1: "
                    "Connection, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, "
                    "Proxy-Connection, Proxy-Authorization): it concerns one connection and "
                    "is never sent on, so it cannot be set") in result.err, (name, result.err)
            config = write_config(tmp_path, database_url, shadows=[
                {"name": "s", "url": target.url, "set_headers": {name: "x"}}])
            check = await cli("check-config", "-c", str(config))
            assert check.status != 0 and result.err.split("--set-header ")[1].strip() in \
                check.out + check.err, (name, check.out, check.err)
        assert target.seen == []
    assert await answers(database_url) == 0


async def test_limit_takes_the_first_n_and_a_rerun_resumes_the_same_n(
        database_url: str, tmp_path: Path) -> None:
    """--limit N selects the oldest N; a rerun with the same --limit completes those N
    (here the one whose answer is missing) instead of taking N more."""
    await store(database_url, [request(i, received_at=1_000 + i) for i in range(10)])
    config = write_config(tmp_path, database_url)
    window = ["--from", "1970-01-01T00:00:00Z", "--to", "1970-01-02T00:00:00Z"]
    async with serve(model("c")) as target:
        first = await replay(config, *window, "--limit", "3", to=target.url)
        assert first.status == 0, first.err
        assert sorted(s.headers["x-request-id"] for s in target.seen) == [
            "req-00000", "req-00001", "req-00002"]
    await fetchval(database_url, "DELETE FROM shadowproxy.responses r USING "
                                 "shadowproxy.requests q WHERE q.id = r.request "
                                 "AND r.target = 'cand' AND q.request_id = 'req-00001'")
    async with serve(model("c")) as target:
        again = await replay(config, *window, "--limit", "3", to=target.url)
        assert again.status == 0, again.err
        assert [s.headers["x-request-id"] for s in target.seen] == ["req-00001"]
    assert await answers(database_url) == 3


async def test_the_recorder_stores_answers_under_the_recording_rules(
        database_url: str, tmp_path: Path) -> None:
    """Replayed answers go through the recorder: the response headers and JSON fields that
    recording redacts are stored as "[redacted]"."""
    async def secretive(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"prediction": 1, "user": {"email": "a@example.com"},
                                          },
                                 headers={"Set-Cookie": "s=cookie-secret"})

    await store(database_url, [request(i) for i in range(2)])
    config = write_config(tmp_path, database_url, recording={"redact_json": ["$.user.email"]})
    async with serve(secretive) as target:
        assert (await replay(config, to=target.url)).status == 0
    row = (await fetch(database_url, "SELECT headers, body_json, body FROM shadowproxy.responses"
                                     " WHERE target = 'cand' LIMIT 1"))[0]
    assert json.loads(row["headers"])["set-cookie"] == "[redacted]"
    assert json.loads(row["body_json"])["user"]["email"] == "[redacted]"
    assert b"a@example.com" not in row["body"]


@pytest.mark.parametrize("bound", [{"queue_max_records": 50}, {"queue_max_bytes": 300_000}])
async def test_answers_wait_for_room_in_the_recorders_queue_and_none_is_dropped(
        database_url: str, tmp_path: Path, bound: dict[str, int]) -> None:
    """A target answering faster than the database takes its answers fills the recorder's
    queue, by records or (large answers) by bytes, long before the replay's own backlog
    mark: sending waits for room, every answer is stored, and the exit status is 0."""
    pad = "x" * 10_000

    async def large(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"prediction": 1.0, "pad": pad})

    await store(database_url, [request(i) for i in range(1000)])
    config = write_config(tmp_path, database_url, recording=bound)
    async with serve(large) as target:
        result = await replay(config, to=target.url)
    assert result.status == 0, result.out + result.err
    assert "dropped" not in result.err
    assert "stored    1000 answers as 'cand'" in result.out
    assert await answers(database_url) == 1000


async def test_errors_are_counted_by_kind_and_force_with_where_redoes_only_them(
        database_url: str, tmp_path: Path) -> None:
    """Calls that time out are stored with their kind and counted in the summary; --force
    with a --where over the target's own rows redoes exactly those."""
    async def slow_on_odd(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        if body["features"]["x"] in (3, 7):
            await asyncio.sleep(5)
        return web.json_response({"prediction": 1})

    await store(database_url, [request(i) for i in range(10)])
    config = write_config(tmp_path, database_url)
    async with serve(slow_on_odd) as flaky, serve(model("c")) as healthy:
        first = await replay(config, "--timeout", "0.5", to=flaky.url)
        assert first.status == 0, first.err
        redo = await replay(config, "--force", "--where",
                            "shadow_name = 'cand' AND shadow_error_kind = 'timeout'",
                            to=healthy.url)
        assert redo.status == 0, redo.err
        assert sorted(s.headers["x-request-id"] for s in healthy.seen) == [
            "req-00003", "req-00007"]
    assert "errors    2 (timeout 2)" in first.out and "answered  8 (2xx 8)" in first.out
    assert "replay cand: 10/10 handled, 2 errors" in first.err
    assert "2 earlier answers replaced (--force)" in redo.out
    assert await fetchval(database_url, "SELECT count(*) FROM shadowproxy.responses "
                                        "WHERE target = 'cand' AND error_kind IS NULL") == 10


async def test_a_target_that_cannot_be_reached_fails_before_anything_is_stored(
        database_url: str, tmp_path: Path) -> None:
    """A --to nothing listens on exits 1 saying so, and stores no connect failures that a
    rerun would then skip."""
    from shadowproxy.demo import free_port

    await store(database_url, [request(i) for i in range(3)])
    config = write_config(tmp_path, database_url)
    result = await replay(config, to=f"http://127.0.0.1:{free_port()}")
    assert result.status == 1
    assert "cannot connect" in result.err and "nothing was sent" in result.err
    assert await answers(database_url) == 0


async def test_a_target_that_does_not_answer_the_connection_is_named_so(
        database_url: str, tmp_path: Path) -> None:
    """A --to whose host drops the connection attempt (a firewall, a dead host) exits 1
    saying that it did not answer within the wait; the message read "cannot connect ()"."""
    await store(database_url, [request(i) for i in range(3)])
    config = write_config(tmp_path, database_url)
    with unaccepting_listener() as url:
        result = await replay(config, "--timeout", "1", to=url)
    assert result.status == 1
    assert f"--to {url}: cannot connect (no answer within 1s); nothing was sent" in result.err
    assert await answers(database_url) == 0


async def test_a_target_whose_certificate_is_not_trusted_is_named_so(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An https:// target whose certificate the trust store does not accept exits 1 saying
    that, and how to trust it, before anything is sent; trusted (SSL_CERT_FILE), it is
    replayed to."""
    from tests.proxy.test_tls_upstream import https_model, self_signed

    await store(database_url, [request(i) for i in range(3)])
    config = write_config(tmp_path, database_url)
    cert, key = self_signed(tmp_path)
    async with https_model(cert, key) as url:
        refused = await replay(config, to=url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = await replay(config, to=url)
    assert refused.status == 1
    assert "the target's TLS certificate is not trusted" in refused.err
    assert "SSL_CERT_FILE" in refused.err and "nothing was sent" in refused.err
    assert trusted.status == 0, trusted.err
    assert await answers(database_url) == 3


async def test_set_json_keeps_long_integers_and_skips_bodies_it_cannot_write_back(
        database_url: str, tmp_path: Path) -> None:
    """An integer past 64 bits goes out as recorded, not as a float; a body holding a number
    JSON cannot write back (1e400), or an integer past 64 bits given by --set-json, does not
    stop the replay: the first is skipped saying why, the second sent."""
    bodies = [b'{"features": {"x": 0}, "id": 18446744073709551616, "n": -9223372036854775809}',
              b'{"features": {"x": 1}, "scale": 1e400}']
    exchanges = [request(i) for i in range(len(bodies))]
    for ex, body in zip(exchanges, bodies, strict=True):
        ex.body, ex.body_size = body, len(body)
    await store(database_url, exchanges)
    config = write_config(tmp_path, database_url)
    async with serve(model("c")) as target:
        result = await replay(config, "--set-json", "$.trace=123456789012345678901234",
                              to=target.url)
        assert result.status == 0, result.err
        assert [s.body for s in target.seen] == [
            b'{"features":{"x":0},"id":18446744073709551616,"n":-9223372036854775809,'
            b'"trace":123456789012345678901234}']
    assert "skipped   1 (--set-json: the edited body cannot be written as JSON" in result.out
    assert "stored    2 answers" in result.out
