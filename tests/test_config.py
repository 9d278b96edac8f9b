"""Configuration loading: every problem reported as FILE:LINE: key.path: message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from shadowproxy.app import listen_socket
from shadowproxy.cli import main
from shadowproxy.config import Settings, load_config
from shadowproxy.errors import ConfigError

GOOD = """\
listen: "127.0.0.1:8080"
database:
  url: "${TEST_DB_URL}"
routes:
  - name: prices
    match: {path_prefix: /predict, methods: [post]}
    primary: {url: "http://127.0.0.1:9001"}
    shadows:
      - {name: candidate, url: "http://127.0.0.1:9002", sample_rate: 0.5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_example_config_is_valid() -> None:
    """The example config shipped in config/ loads."""
    settings = load_config(Path(__file__).parent.parent / "config" / "example.yaml")
    assert settings.routes[0].shadows[0].name == "candidate"


def test_env_interpolation_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} is read from the environment, and SHADOWPROXY_DATABASE_URL wins over the file."""
    monkeypatch.setenv("TEST_DB_URL", "postgresql://u@h/db")
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    settings = load_config(write(tmp_path, GOOD))
    assert settings.database.url == "postgresql://u@h/db"
    assert settings.routes[0].match.methods == ["POST"]
    assert settings.data_dir.is_absolute()
    monkeypatch.setenv("SHADOWPROXY_DATABASE_URL", "postgresql://override@h/db")
    assert load_config(write(tmp_path, GOOD)).database.url == "postgresql://override@h/db"


def test_every_problem_is_listed_with_its_line(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown keys, bad URLs, rates, durations and unset variables are all reported at once."""
    monkeypatch.delenv("NOPE", raising=False)
    bad = """\
listen: "127.0.0.1:8080"
routes:
  - name: a
    primary: {url: "ftp://x", timeout_s: -1}
    shadows:
      - name: s
        url: "http://${NOPE}"
        sample_rate: 1.5
        colour: blue
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{tmp_path / 'c.yaml'}:4: routes[0].primary.url: expected an http" in text
    assert ":4: routes[0].primary.timeout_s: Input should be greater than 0" in text
    assert ":7: routes[0].shadows[0].url: environment variable NOPE is not set" in text
    assert ":8: routes[0].shadows[0].sample_rate:" in text
    assert ":9: routes[0].shadows[0].colour: unknown key" in text


def test_a_value_of_several_forms_gets_one_problem_at_its_key(tmp_path: Path) -> None:
    """A key that takes values of several forms (a slice as SQL text or {feature: F}, a
    positive class, a column) is reported once, at the file's key path: the form the value
    was meant as when it has that form, else the forms it may take."""
    bad = """\
routes:
  - name: a
    primary: {url: "http://127.0.0.1:9001"}
    compare:
      positive_class: [1]
      request_format: instances
      features:
        f: {column: 1.5}
      slices:
        by_f: {feature: f, bin: [0, 1, 2]}
        order: {feature: f, bins: [3, 1]}
        nothing: 5
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    problems = [p.split(":", 1)[1] for p in info.value.problems]
    assert problems == [
        "5: routes[0].compare.positive_class: expected text, a number or true/false (got [1])",
        "8: routes[0].compare.features.f.column: expected a whole number or text (got 1.5)",
        "10: routes[0].compare.slices.by_f.bin: unknown key (check its spelling and the "
        "configuration reference)",
        "11: routes[0].compare.slices.order: bins: expected increasing edges (got [3.0, 1.0])",
        "12: routes[0].compare.slices.nothing: expected text or a mapping (got 5)",
    ]


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    """Route names, and shadow names within a route, must be unique."""
    dup = """\
routes:
  - {name: a, primary: {url: "http://127.0.0.1:1"},
     shadows: [{name: s, url: "http://127.0.0.1:2"}, {name: s, url: "http://127.0.0.1:3"}]}
  - {name: a, primary: {url: "http://127.0.0.1:1"}}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, dup))
    problems = info.value.problems
    # Each reported once, at the repeated name's own line.
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems
            if "must be unique" in p] == ["3", "4"]
    assert len(problems) == 2


def test_settings_built_in_code_check_names_too() -> None:
    """A Settings made in code, not from a file, refuses repeated route names as well."""
    route = {"name": "a", "primary": {"url": "http://127.0.0.1:1"}}
    with pytest.raises(ValidationError, match="route names must be unique"):
        Settings.model_validate({"routes": [route, route]})


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("routes: [\n", "(YAML)"),
    ("- a\n- b\n", "expected a mapping"),
    ("routes: []\n", "routes: List should have at least 1 item"),
])
def test_unusable_files_are_explained(tmp_path: Path, text: str, expected: str) -> None:
    """Empty, malformed and wrongly shaped files give a message saying what is wrong."""
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("line, expected", [
    ("admin_token: !ENV ADMIN_TOKEN", "admin_token: the tag !ENV is not supported"),
    ("data_dir: 2026-02-30", "data_dir: cannot read '2026-02-30' as a YAML timestamp"),
    ("watch: !!bool maybe", "watch: cannot read 'maybe' as a YAML bool"),
    ("access_log: !!int x", "access_log: cannot read 'x' as a YAML int"),
    ("routes_x: &loop [*loop]", "an alias refers to the block it is in"),
    ("x: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
])
def test_values_yaml_cannot_construct_are_explained(tmp_path: Path, line: str,
                                                    expected: str) -> None:
    """A tag YAML does not know, a date that is none, a value that is not of its explicit
    type, an alias inside itself: each is a problem of the file at its line (a ConfigError,
    which a reload reports), not an exception of the YAML library."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + line + "\n"))
    assert any(expected in problem for problem in info.value.problems), info.value.problems
    if "[" not in line:
        assert f"c.yaml:10: {expected}" in str(info.value)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """check-config exits 0 for a good file and 2 with the problems for a bad one."""
    monkeypatch.setenv("TEST_DB_URL", "postgresql://u@h/db")
    assert main(["check-config", "-c", str(write(tmp_path, GOOD))]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path, "routes:\n  - {name: a, primary: {url: nope}}\n")
    assert main(["check-config", "-c", str(bad)]) == 2
    assert f"{bad}:2: routes[0].primary.url" in capsys.readouterr().err
    assert main(["check-config", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


def test_an_upstream_url_with_credentials_is_refused_without_quoting_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`http://user:token@host` as a primary's or a shadow's URL: check-config exits 2 and
    says where the credentials go instead, without repeating them. The user part was
    dropped: the upstream got no Authorization header and answered 401 to every call."""
    path = write(tmp_path, """\
routes:
  - name: a
    primary: {url: "http://puser:ptoken@127.0.0.1:9001"}
    shadows:
      - {name: s, url: "https://suser:stoken@127.0.0.1:9002/v1"}
      - {name: t, url: "http://only-a-token@127.0.0.1:9003"}
""")
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    never_sent = ("a user name or password in the URL (before '@') is never sent: no "
                  "Authorization header is made of it; ")
    assert f"{path}:3: routes[0].primary.url: {never_sent}the primary gets each client's " \
           "own Authorization header, and the proxy adds none" in err
    for line, i in ((5, 0), (6, 1)):
        assert f"{path}:{line}: routes[0].shadows[{i}].url: {never_sent}take it out of the " \
               "URL and set the header in this shadow's set_headers, e.g. {Authorization: " \
               '"Bearer ${TOKEN}"}' in err, err
    for secret in ("puser", "ptoken", "suser", "stoken", "only-a-token"):
        assert secret not in err, err
    # An '@' in the path is no user part.
    ok = write(tmp_path, 'routes: [{name: a, primary: {url: "http://127.0.0.1:9001/@me"}}]\n')
    assert load_config(ok).routes[0].primary.url == "http://127.0.0.1:9001/@me"


def test_a_refused_url_is_quoted_without_its_user_part_and_query_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A message that quotes an upstream's URL (a wrong scheme, a query, a bad host name, a
    shadow that is its primary) shows its user part, query values and fragment as ***:
    they were quoted whole, to stderr, the log and the answer of POST /-/reload."""
    path = write(tmp_path, """\
routes:
  - name: a
    primary: {url: "http://127.0.0.1:9001?api_key=S1"}
    shadows:
      - {name: b, url: "htp://U2:S2@127.0.0.1:9002"}
      - {name: c, url: "http://127.0.0.1:9003/v1?token=S3&S4#S5"}
      - {name: d, url: "http://a..b:9004/?key=S6"}
      - {name: e, url: "http://U7:S7@127.0.0.1:9001"}
""")
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in [
        f"{path}:3: routes[0].primary.url: URL must not carry a query or fragment (got "
        "'http://127.0.0.1:9001?api_key=***')",
        f"{path}:5: routes[0].shadows[0].url: expected an http:// or https:// URL (got "
        "'htp://***@127.0.0.1:9002')",
        f"{path}:6: routes[0].shadows[1].url: URL must not carry a query or fragment (got "
        "'http://127.0.0.1:9003/v1?token=***&***#***')",
        f"{path}:7: routes[0].shadows[2].url: URL has an invalid host name (label empty or "
        "too long): a host name is labels of 1 to 63 characters joined by dots (got "
        "'http://a..b:9004/?key=***')",
        f"{path}:8: routes[0].shadows[3].url: the shadow's URL is the primary's "
        "(http://***@127.0.0.1:9001): every request would reach the primary twice",
    ]:
        assert expected in err, (expected, err)
    assert not [s for s in ("S1", "U2", "S2", "S3", "S4", "S5", "S6", "U7", "S7") if s in err], err


def test_an_unset_variable_is_reported_once(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset ${VAR} gives one problem, not a second one about the placeholder's form."""
    monkeypatch.delenv("NOPE_URL", raising=False)
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    text = 'database: {url: "${NOPE_URL}"}\nroutes: [{name: a, primary: {url: "http://h"}}]\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(info.value.problems) == 1
    assert "environment variable NOPE_URL is not set" in info.value.problems[0]


@pytest.mark.parametrize("primary, shadow", [
    ("http://127.0.0.1:9001", "http://[::1:9002"),
    ("http://[::1:9001", "http://127.0.0.1:9002"),
])
def test_an_ipv6_url_without_its_bracket_is_reported_at_its_line(
        tmp_path: Path, primary: str, shadow: str) -> None:
    """An IPv6 upstream URL whose closing bracket is missing, on a route with a shadow, is a
    problem of that URL at its line (the check that a shadow is not its primary leaves it
    to the URL's own check), not an exception."""
    text = f"""\
routes:
  - name: a
    primary: {{url: "{primary}"}}
    shadows:
      - {{name: s, url: "{shadow}"}}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    line = 3 if "[" in primary else 5
    where = "primary.url" if "[" in primary else "shadows[0].url"
    assert info.value.problems == [
        f"{tmp_path / 'c.yaml'}:{line}: routes[0].{where}: Invalid IPv6 URL"]


@pytest.mark.parametrize("host", ["a..b", ".", "a" * 64 + ".example.com"])
def test_a_host_name_that_cannot_be_sent_is_reported_at_its_line(
        tmp_path: Path, host: str) -> None:
    """A host name with an empty label or one over 63 characters is a problem of its URL at
    its line: the proxy could not write it in a Host header. It passed the check, and then
    `run` ended with a traceback, and a reload with workers said `applied` while every
    worker failed to apply it and went on with the old configuration."""
    text = f"""\
routes:
  - name: a
    primary: {{url: "http://127.0.0.1:9001"}}
    shadows:
      - {{name: s, url: "http://{host}:9002"}}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        f"{tmp_path / 'c.yaml'}:5: routes[0].shadows[0].url: URL has an invalid host name "
        "(label empty or too long): a host name is labels of 1 to 63 characters joined by "
        f"dots (got 'http://{host}:9002')"]


@pytest.mark.parametrize(("path", "shown"), [("/v 1", "' '"), ("/v\x011", "'\\x01'")])
def test_a_url_path_a_request_line_cannot_hold_is_reported_at_its_line(
        tmp_path: Path, path: str, shown: str) -> None:
    """A space or a control character in an upstream URL's path is a problem of
    the URL at its line: it was accepted, and every request sent with a broken request line
    (a primary at `http://h/v 1` answered each one 400)."""
    url = f"http://127.0.0.1:9001{path}"
    written = url.replace("\x01", "\\x01")  # YAML's escape in a double-quoted scalar
    text = f'routes:\n  - name: a\n    primary: {{url: "{written}"}}\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        f"{tmp_path / 'c.yaml'}:3: routes[0].primary.url: URL path holds {shown}, which a "
        f"request line cannot; percent-encode it (a space is %20) (got {url!r})"]
    path = written.removeprefix("http://127.0.0.1:9001")
    assert load_config(write(tmp_path, text.replace(path, "/v%201"))
                       ).routes[0].primary.url == "http://127.0.0.1:9001/v%201"
    # Non-ASCII goes out as UTF-8, as it did: servers take it.
    assert load_config(write(tmp_path, text.replace(path, "/mod\u00e8le"))
                       ).routes[0].primary.url == "http://127.0.0.1:9001/mod\u00e8le"


def test_a_shadow_at_the_primary_and_unknown_methods_are_refused(tmp_path: Path) -> None:
    """A shadow URL naming the primary (however spelled) and method names that are not HTTP
    methods are reported at their own lines."""
    bad = """\
routes:
  - name: a
    match: {methods: [post, PSOT]}
    primary: {url: "http://127.0.0.1:9001/v1"}
    shadows:
      - name: s
        url: "HTTP://127.0.0.1:9001/v1/"
      - name: t
        url: "http://127.0.0.1:9002/v1"
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    text = "\n".join(info.value.problems)
    assert ":3: routes[0].match.methods: not an HTTP method: 'PSOT' (expected some of GET" \
        in text
    assert ":7: routes[0].shadows[0].url: the shadow's URL is the primary's" in text
    assert "shadows[1]" not in text


@pytest.mark.parametrize(("prefix", "suggested"), [
    ("/café", "/caf%C3%A9"), ("/my model", "/my%20model"), ("/a\tb", "/a%09b")])
def test_a_path_prefix_no_request_path_holds_is_refused(tmp_path: Path, prefix: str,
                                                         suggested: str) -> None:
    """A prefix with a character a request path never holds (beyond ASCII, a space, a
    control character) matched no request: it is refused at its line with the form clients
    send, which is accepted."""
    text = ('routes:\n  - name: a\n    primary: {url: "http://h"}\n'
            f'    match: {{path_prefix: {json.dumps(prefix)}}}\n')
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(info.value.problems) == 1
    assert ":4: routes[0].match.path_prefix: " in info.value.problems[0]
    assert f"e.g. {suggested!r}" in info.value.problems[0]
    settings = load_config(write(tmp_path, text.replace(json.dumps(prefix), suggested)))
    assert settings.routes[0].match.path_prefix == suggested


def test_listen_forms_and_an_admin_listener_on_the_proxy_address(tmp_path: Path) -> None:
    """`:PORT` means every interface; admin_listen on listen's address is reported at the
    admin_listen line, also when one side is every interface or when the two spell one
    address differently (localhost and 127.0.0.1 passed, and the start failed asking
    whether another process used the port). The same port on other addresses is fine."""
    ok = load_config(write(tmp_path, 'listen: ":8080"\nadmin_listen: ":9090"\n'
                                     'routes: [{name: a, primary: {url: "http://h"}}]\n'))
    assert (ok.listen, ok.admin_listen) == (":8080", ":9090")
    ok = load_config(write(tmp_path, 'listen: "127.0.0.1:8080"\nadmin_listen: "127.0.0.2:8080"'
                                     '\nroutes: [{name: a, primary: {url: "http://h"}}]\n'))
    assert (ok.listen, ok.admin_listen) == ("127.0.0.1:8080", "127.0.0.2:8080")
    sock = listen_socket(":0")
    try:
        assert sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()
    for listen, admin in ((":8080", "127.0.0.1:8080"), ("127.0.0.1:8080", "127.0.0.1:8080"),
                          ("127.0.0.1:8080", "localhost:8080"), ("localhost:8080", "127.1:8080")):
        text = (f'listen: "{listen}"\nroutes: [{{name: a, primary: {{url: "http://h"}}}}]\n'
                f'admin_listen: "{admin}"\n')
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert info.value.problems == [
            f"{tmp_path / 'c.yaml'}:3: admin_listen: admin_listen must differ from listen "
            "(the same port on an address both bind, e.g. localhost and 127.0.0.1, or on "
            "every interface); give the admin endpoints their own port, e.g. :9090"]


def test_a_port_as_a_number_and_a_database_url_as_a_string_say_what_to_write(
        tmp_path: Path) -> None:
    """`listen: 8080` (YAML reads a number) and `database: "postgresql://..."` (a URL where
    a block goes): each message gives the form to write, not the type pydantic expected."""
    path = write(tmp_path, 'listen: 8080\nadmin_listen: 9090\ndatabase: "postgresql://h/db"\n'
                           'routes: [{name: a, primary: {url: "http://h"}}]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f'{path}:1: listen: expected "HOST:PORT", e.g. "127.0.0.1:8080", or ":8080" for every '
        "interface (got the number 8080)",
        f'{path}:2: admin_listen: expected "HOST:PORT", e.g. "127.0.0.1:9090", or ":9090" for '
        "every interface (got the number 9090)",
        f"{path}:3: database: expected a block with the URL under url: (database: {{url: "
        "postgresql://...}), or url: null for the embedded database; SHADOWPROXY_DATABASE_URL "
        "also sets it"]


def test_a_number_where_text_goes_says_to_quote_it_without_repeating_it(
        tmp_path: Path) -> None:
    """`admin_token: 84729183746` or `database.url: 5432` (YAML reads digits as a number, a
    bare date as a date): the message says to quote it, not "Input should be a valid
    string", and does not repeat the value (a token; YAML reads 0123 as 83)."""
    path = write(tmp_path, """\
admin_token: 84729183746
database:
  url: 5432
routes:
  - name: 2024-01-31
    primary: {url: "http://127.0.0.1:9001"}
    shadows: [{name: s, url: "http://127.0.0.1:9002", set_headers: {X-Flag: on}}]
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    reads = "expected text, but YAML reads this value as"
    assert info.value.problems == [
        f'{path}:1: admin_token: {reads} a number when it is not quoted: put it in quotes, '
        'e.g. admin_token: "..."',
        f'{path}:3: database.url: {reads} a number when it is not quoted: put it in quotes, '
        'e.g. url: "..."',
        f'{path}:5: routes[0].name: {reads} a date when it is not quoted: put it in quotes, '
        'e.g. name: "..."',
        f"{path}:7: routes[0].shadows[0].set_headers.X-Flag: {reads} true/false when it is "
        'not quoted: put it in quotes, e.g. X-Flag: "..."']
    assert "84729183746" not in str(info.value)
    quoted = write(tmp_path, 'admin_token: "0123"\nroutes: [{name: a, primary: {url: '
                             '"http://127.0.0.1:9001"}}]\n')
    assert load_config(quoted).admin_token == "0123"


@pytest.mark.parametrize(("headers", "message"), [
    ('{"X-A": "1\\r\\nX-Injected: yes"}', "X-A: the value must not contain line breaks"),
    ('{"Content-Length": "0"}', "Content-Length is written by the proxy itself"),
    ('{"X-Request-Id": "fixed"}', "X-Request-Id is written by the proxy itself"),
    ('{"Proxy-Authorization": "Basic x"}', "Proxy-Authorization is a hop-by-hop header"),
    ('{"bad name": "x"}', "'bad name' is not a header name"),
    ('{"X-B": "caf\\u00e9 \\u2713"}', "X-B: HTTP/1.1 header values are Latin-1 text"),
    ('{"X-Tenant": "a", "x-tenant": "b"}',
     "x-tenant is set twice (X-Tenant and x-tenant: header names are case-insensitive)"),
])
def test_a_shadows_set_headers_are_checked(tmp_path: Path, headers: str, message: str) -> None:
    """What set_headers adds goes into the shadow's request head as written: a line break
    would add a header, a framing or forwarding header the proxy writes would be doubled,
    one header named twice in different case was sent twice, and a value that is not
    Latin-1 cannot be sent. Each is refused at its line."""
    path = write(tmp_path, 'routes:\n  - name: a\n    primary: {url: "http://h"}\n'
                           '    shadows:\n      - name: s\n        url: "http://s"\n'
                           f'        set_headers: {headers}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}:7: routes[0].shadows[0].set_headers: ")
    assert message in info.value.problems[0]
    ok = write(tmp_path, 'routes:\n  - name: a\n    primary: {url: "http://h"}\n'
                         '    shadows:\n      - name: s\n        url: "http://s"\n'
                         '        set_headers: {Authorization: "Bearer shadow-t0ken"}\n')
    assert load_config(ok).routes[0].shadows[0].set_headers == {
        "Authorization": "Bearer shadow-t0ken"}


def test_redact_headers_are_header_names(tmp_path: Path) -> None:
    """recording.redact_headers lists header names: one that is none (a space, a colon)
    matched no header and silently redacted nothing. Each is refused at its own line."""
    path = write(tmp_path, 'recording:\n  redact_headers:\n    - authorization\n'
                           '    - "x-api key"\n    - "cookie:"\n'
                           'routes: [{name: a, primary: {url: "http://h"}}]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:4: recording.redact_headers[1]: 'x-api key' is not a header name (letters, "
        "digits and !#$%&'*+.^_`|~- only)",
        f"{path}:5: recording.redact_headers[2]: 'cookie:' is not a header name (letters, "
        "digits and !#$%&'*+.^_`|~- only)"]
    ok = write(tmp_path, 'recording: {redact_headers: [Authorization, X-Api-Key]}\n'
                         'routes: [{name: a, primary: {url: "http://h"}}]\n')
    assert load_config(ok).recording.redact_headers == ["authorization", "x-api-key"]


@pytest.mark.parametrize(("names", "message"), [
    ("[x-debug, Content-Length]", "Content-Length frames the request"),
    ("[host]", "host frames the request"),
    ("[Transfer-Encoding]", "Transfer-Encoding frames the request"),
    ('["X Debug"]', "'X Debug' is not a header name"),
])
def test_a_shadows_remove_headers_name_headers_it_can_keep_from_it(
        tmp_path: Path, names: str, message: str) -> None:
    """remove_headers names headers the shadow never receives: one that frames the request
    (written by the proxy for every upstream) cannot be kept from it and is refused at its
    line; a header of the client's, a hop-by-hop one (never passed on), or one of the
    forwarding headers the proxy writes (X-Forwarded-*, X-Request-Id) is accepted."""
    head = ('routes:\n  - name: a\n    primary: {url: "http://h"}\n'
            '    shadows:\n      - name: s\n        url: "http://s"\n')
    path = write(tmp_path, head + f"        remove_headers: {names}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(
        f"{path}:7: routes[0].shadows[0].remove_headers: ")
    assert message in info.value.problems[0]
    names_ok = ["Cookie", "X-Debug", "Connection", "X-Forwarded-For", "x-forwarded-proto",
                "X-Forwarded-Host", "X-Request-Id"]
    ok = write(tmp_path, head + f"        remove_headers: [{', '.join(names_ok)}]\n")
    assert load_config(ok).routes[0].shadows[0].remove_headers == names_ok


def test_a_shadows_max_duration_covers_its_timeout(tmp_path: Path) -> None:
    """max_duration_s bounds the whole shadow call, so one shorter than timeout_s (the time
    allowed to the head) is refused at the shadow's line, saying why."""
    path = write(tmp_path, 'routes:\n  - name: a\n    primary: {url: "http://h"}\n'
                           '    shadows:\n      - name: s\n        url: "http://s"\n'
                           '        timeout_s: 30\n        max_duration_s: 10\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:5: routes[0].shadows[0]: max_duration_s (10) is shorter than timeout_s (30): "
        "it bounds the whole call, so it is at least the time allowed to the response head"]
    shadow = load_config(write(tmp_path, 'routes:\n  - name: a\n    primary: {url: "http://h"}\n'
                                         '    shadows: [{name: s, url: "http://s"}]\n')
                         ).routes[0].shadows[0]
    assert (shadow.timeout_s, shadow.max_duration_s) == (30.0, 600.0)


def test_a_watch_interval_that_would_keep_a_core_busy_is_refused(tmp_path: Path) -> None:
    """watch_interval_s below 0.05 s is refused at its line, saying why: the file is read on
    the event loop at each poll, and a microsecond kept the proxy at 100% of a core idle."""
    route = 'routes:\n  - name: a\n    primary: {url: "http://h"}\n'
    path = write(tmp_path, "watch: true\nwatch_interval_s: 0.000001\n" + route)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2: watch_interval_s: expected at least 0.05 s (got 1e-06): each poll reads "
        "the file on the proxy's event loop; the default, 1, sees an edit within 2 s"]
    assert load_config(write(tmp_path, "watch_interval_s: 0.05\n" + route)
                       ).watch_interval_s == 0.05


def test_a_tab_is_explained_at_its_line(tmp_path: Path) -> None:
    """A tab in the indentation gives FILE:LINE and what to do, not PyYAML's raw message."""
    path = write(tmp_path, "routes:\n  - name: a\n\tprimary: {url: 'http://h'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:3: (YAML): a tab character (column 1): YAML indents with spaces only; "
        "replace the tab with spaces"]


def test_set_json_paths_are_checked_at_their_own_lines(tmp_path: Path) -> None:
    """A shadow's ``set_json`` loads as given; a path that cannot be read is reported at
    its own line, with the forms a path takes."""
    text = """\
routes:
  - name: a
    primary: {url: "http://127.0.0.1:9001"}
    shadows:
      - name: s
        url: "http://127.0.0.1:9002"
        set_json:
          model: large
          stream_options: {include_usage: true}
          messages[0].content: "You are terse."
      - name: t
        url: "http://127.0.0.1:9003"
        set_json:
          model: large
          "messages[x]": 1
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        f"{tmp_path / 'c.yaml'}:15: routes[0].shadows[1].set_json.messages[x]: set_json: "
        "cannot read the path 'messages[x]' at '[x]'; use names joined by dots, [n] for a "
        'list index and ["name"] for a name with dots or brackets']
    settings = load_config(write(tmp_path, text.replace('"messages[x]"', "n")))
    assert settings.routes[0].shadows[0].set_json == {
        "model": "large", "stream_options": {"include_usage": True},
        "messages[0].content": "You are terse."}


def test_storage_keys_default_and_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.partition is day and retention unset by default; a retention reads like
    prune's --older-than."""
    from datetime import timedelta

    monkeypatch.setenv("TEST_DB_URL", "postgresql://u@h/db")
    default = load_config(write(tmp_path, GOOD)).storage
    assert (default.partition, default.retention) == ("day", None)
    text = GOOD + "storage:\n  partition: hour\n  retention: 30d\n"
    storage = load_config(write(tmp_path, text)).storage
    assert (storage.partition, storage.retention) == ("hour", timedelta(days=30))
    assert storage.model_dump(mode="json")["retention"] == "30d"


@pytest.mark.parametrize(("storage", "expected"), [
    ("partition: month", "storage.partition: Input should be 'hour', 'day' or 'week'"),
    ("retention: 30 days", "storage.retention: expected a whole number and a unit s, m, h, "
                           "d or w, e.g. 30d"),
    ("retention: 30", "storage.retention: expected a whole number and a unit"),
    ("retention: 0d", "storage.retention: an age of 0 would mean every record"),
    ("retention: 99999999999d", "storage.retention: too large an age"),
    ("retention: 36526d", "storage.retention: too large an age: at most 36525d"),
    ("retention: 5300w", "storage.retention: too large an age: at most 36525d"),
    ("maintenance_interval_s: 0", "storage.maintenance_interval_s: Input should be greater"),
])
def test_storage_keys_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  storage: str, expected: str) -> None:
    """A wrong partition period or retention is reported at its line, saying what fits."""
    monkeypatch.setenv("TEST_DB_URL", "postgresql://u@h/db")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + f"storage:\n  {storage}\n"))
    assert any(p.endswith(expected) or expected in p for p in info.value.problems), \
        info.value.problems
    assert any(":11: storage." in p for p in info.value.problems), info.value.problems


def test_a_feature_bound_that_is_nan_is_refused(tmp_path: Path) -> None:
    """A feature's `min` or `max` of NaN is refused at its feature, as NaN bin edges are: no
    value is ever outside it, so the range check the file asks for passed everything."""
    bad = """\
routes:
  - name: r
    primary: {url: "http://127.0.0.1:1"}
    compare:
      features:
        bmi: {path: "$.features.bmi", min: .nan, max: 70}
        age: {path: "$.features.age", max: .NaN}
        bp: {path: "$.features.bp", min: -.inf, max: .inf}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    problems = [p.split(":", 1)[1] for p in info.value.problems]
    assert problems == [
        "6: routes[0].compare.features.bmi: min: expected a number, not NaN (leave the key "
        "out for no bound)",
        "7: routes[0].compare.features.age: max: expected a number, not NaN (leave the key "
        "out for no bound)",
    ]


INFINITE = """\
watch_interval_s: {inf}
storage: {{maintenance_interval_s: {inf}}}
limits: {{upstream_idle_s: {inf}, client_timeout_s: {inf}, shutdown_grace_s: {inf}}}
routes:
  - name: r
    primary: {{url: "http://127.0.0.1:1", timeout_s: {inf}}}
    shadows:
      - {{name: s, url: "http://127.0.0.1:2", timeout_s: {inf}, max_duration_s: {inf}}}
    compare:
      generation:
        embeddings: {{url: "http://127.0.0.1:3/v1/embeddings", timeout_s: {inf}}}
"""


@pytest.mark.parametrize("inf", [".inf", ".Inf", '"inf"', "Infinity", "1e400"])
def test_an_infinite_number_of_seconds_is_refused(tmp_path: Path, inf: str) -> None:
    """Every `*_s` key refuses infinity (YAML's `.inf`, or text that reads as it), at its
    line, saying what to write instead: it is above 0, and a timeout of it waited without
    end, an interval of it ran once, a watch of it never read the file again."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, INFINITE.format(inf=inf)))
    problems = [p.split(":", 1)[1].split(": ", 2) for p in info.value.problems]
    finite = "expected a finite number of seconds (got inf): "
    assert [f"{line}: {key}" for line, key, _ in problems] == [
        "1: watch_interval_s", "2: storage.maintenance_interval_s",
        "3: limits.upstream_idle_s", "3: limits.client_timeout_s",
        "3: limits.shutdown_grace_s", "6: routes[0].primary.timeout_s",
        "8: routes[0].shadows[0].timeout_s", "8: routes[0].shadows[0].max_duration_s",
        "11: routes[0].compare.generation.embeddings.timeout_s"], problems
    assert all(message.startswith(finite) for _, _, message in problems), problems
    assert problems[0][2].endswith("to not watch it, write watch: false")
    assert problems[5][2].endswith("give the longest an answer may take, e.g. 300")


def test_settings_built_in_code_refuse_infinite_seconds() -> None:
    """The check is the models', not only the file loader's."""
    with pytest.raises(ValidationError, match="expected a finite number of seconds"):
        Settings.model_validate({"limits": {"shutdown_grace_s": float("inf")},
                                 "routes": [{"name": "r",
                                             "primary": {"url": "http://127.0.0.1:1"}}]})


def test_a_boolean_is_no_number(tmp_path: Path) -> None:
    """A number written as a YAML boolean (true/false, yes/no, on/off) is refused at its
    key: pydantic read it as 1 or 0, so `max_body_bytes: off` recorded no body at all and
    `queue_max_records: yes` kept a queue of one record. A key that takes booleans too
    (`positive_class`) still takes them."""
    bad = """\
workers: yes
recording: {max_body_bytes: off, queue_max_records: on}
routes:
  - name: r
    primary: {url: "http://127.0.0.1:1", timeout_s: true}
    shadows: [{name: s, url: "http://127.0.0.1:2", sample_rate: no}]
    compare:
      positive_class: true
      thresholds: {alpha: false}
      features: {bmi: {path: "$.bmi", min: false}}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    problems = sorted(p.split(":", 1)[1] for p in info.value.problems)
    boolean = "expected a number, not the boolean {} (YAML reads true/false, yes/no and on/off " \
              "as booleans)"
    assert problems == sorted([
        f"1: workers: {boolean.format('true')}",
        f"2: recording.max_body_bytes: {boolean.format('false')}",
        f"2: recording.queue_max_records: {boolean.format('true')}",
        f"5: routes[0].primary.timeout_s: {boolean.format('true')}",
        f"6: routes[0].shadows[0].sample_rate: {boolean.format('false')}",
        f"9: routes[0].compare.thresholds.alpha: {boolean.format('false')}",
        f"10: routes[0].compare.features.bmi.min: {boolean.format('false')}",
    ]), problems
    good = load_config(write(tmp_path, """\
routes:
  - name: r
    primary: {url: "http://127.0.0.1:1"}
    compare: {positive_class: true}
"""))
    assert good.routes[0].compare is not None
    assert good.routes[0].compare.positive_class is True


@pytest.mark.parametrize(("partition", "interval", "ahead"), [
    ("hour", 172800, "48 hours (172800 s)"), ("day", 604800, "7 days (604800 s)"),
    ("week", 2419200, "4 weeks (2419200 s)")])
def test_maintenance_runs_before_the_partitions_ahead_end(
        tmp_path: Path, partition: str, interval: int, ahead: str) -> None:
    """Runs further apart than the partitions each one makes ahead would leave the records
    of the time between in the DEFAULT partition: refused at the key; a second less is
    taken."""
    text = """\
storage:
  partition: {partition}
  maintenance_interval_s: {interval}
routes: [{{name: r, primary: {{url: "http://127.0.0.1:1"}}}}]
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.format(partition=partition, interval=interval)))
    assert [p.split(":", 1)[1] for p in info.value.problems] == [
        f"3: storage.maintenance_interval_s: expected less than the partitions made ahead, "
        f"{ahead} with partition: {partition} (got {interval}): the records of the time "
        "between two runs would go to the DEFAULT partition; run it more often (the "
        "default is 300)"]
    settings = load_config(write(tmp_path, text.format(partition=partition,
                                                       interval=interval - 1)))
    assert settings.storage.maintenance_interval_s == interval - 1


@pytest.mark.parametrize(("password", "problem"), [
    ("Xq7/Zk9", "an '@' comes after the host"),
    ("Xq7?Zk9", "an '@' comes after the host"),
    ("Xq7#Zk9", "an '@' comes after the host"),
    ("Xq7@Zk9", "the part before the host holds an '@'"),
])
def test_a_database_url_with_a_password_not_percent_encoded_is_refused_unquoted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        password: str, problem: str) -> None:
    """A password holding / ? or # unencoded ends the URL's authority early: asyncpg took
    part of it for a port or a query, `shadowproxy migrate` ended in a traceback quoting it
    (`invalid literal for int() with base 10: 'Xq7'`) and `shadowproxy run` spooled for
    good, ready, as if the database were down a while. It is now a problem of the file
    (exit 2) saying what to encode, in words that quote no part of the URL; also from
    SHADOWPROXY_DATABASE_URL."""
    url = f"postgresql://sp:{password}@127.0.0.1:5432/sp"
    monkeypatch.setenv("TEST_DB_URL", url)  # database.url in the file
    for env in ("TEST_DB_URL", "SHADOWPROXY_DATABASE_URL"):
        monkeypatch.setenv(env, url)
        assert main(["migrate", "-c", str(write(tmp_path, GOOD))]) == 2
        err = capsys.readouterr().err
        assert f"database.url: this URL cannot be read: {problem}; in a user name or " \
               "password, write / ? # @ and % percent-encoded" in err
        assert "Xq7" not in err and "Zk9" not in err
    encoded = url.replace(password, password.replace("/", "%2F").replace("?", "%3F")
                          .replace("#", "%23").replace("@", "%40"))
    assert Settings.model_validate({"database": {"url": encoded},
                                    "routes": [{"name": "a", "primary": {"url": "http://h"}}]})


@pytest.mark.parametrize(("url", "port"), [
    ("postgresql://u:secret@db.internal:notaport/app", "'notaport'"),
    ("postgresql://u@db.internal:99999/app", "99999"),
    ("postgresql://u@h1:5432,h2:54x32/app", "'54x32'"),
    ("postgresql://u@/app?host=/run/postgresql&port=abc", "'abc'"),
])
def test_a_database_url_with_a_port_that_is_no_port_is_refused_at_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        url: str, port: str) -> None:
    """A port that is not a number from 1 to 65535, after a host or as ?port=, is the
    configuration's problem (exit status 2, its line), and the password is not echoed:
    `migrate` (every command that connects) ended with asyncpg's ValueError or the
    socket's OverflowError and their tracebacks, `check-config` said OK."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    monkeypatch.setenv("TEST_DB_URL", url)
    path = write(tmp_path, GOOD)
    for command in ("check-config", "migrate"):
        assert main([command, "-c", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == (f"{path}:3: database.url: the port {port} is not a number from 1 to "
                       "65535; correct it, or leave it out for PostgreSQL's 5432\n"), err


def test_a_database_url_of_several_hosts_is_accepted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts with and without ports, an IPv6 address, and ?port= are forms asyncpg reads."""
    monkeypatch.delenv("SHADOWPROXY_DATABASE_URL", raising=False)
    for url in ("postgresql://u:p@h1:5432,h2,[::1]:5433/app",
                "postgresql://u@/app?host=/run/postgresql&port=5433",
                "postgres://u@[2001:db8::1]/app"):
        monkeypatch.setenv("TEST_DB_URL", url)
        assert load_config(write(tmp_path, GOOD)).database.url == url
