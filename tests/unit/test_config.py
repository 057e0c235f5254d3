"""Unit tests of the dialplan package: YAML -> Config, and errors that point at lines.

Line numbers are asserted through :func:`line_of`, which finds a marker in the test's own YAML,
so a test states *which* line is meant rather than a bare number.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from dialplan import (
    ALL_PERMISSIONS,
    MAX_DELEGATES,
    MAX_DELEGATORS,
    Algorithm,
    Config,
    ConfigError,
    ConfigIssue,
    Delegate,
    Permission,
    User,
    default_config_path,
    load_config,
    load_config_text,
    load_default_config,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE = "test.yaml"

HEAD = """\
domain: example.test
listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]
http: 127.0.0.1:8080
data_dir: var
media: {address: 127.0.0.1, ports: 20000-20999}
"""

USERS = """\
users:
  - {extension: "1001", name: Alice Exec, password: secret1}
  - {extension: "1002", name: Bob Assistant, password: secret2}
  - {extension: "1003", name: Carol Assistant, password: secret3}
"""


def yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def load(text: str) -> Config:
    return load_config_text(text, source=SOURCE)


def problems(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value.issues


def problem(text: str) -> ConfigIssue:
    """The single issue ``text`` produces."""
    issues = problems(text)
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


def line_of(text: str, marker: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line containing ``marker``."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    return hits[occurrence - 1]


def with_users(*lines: str) -> str:
    return HEAD + "users:\n" + "".join(f"  - {line}\n" for line in lines)


# --------------------------------------------------------------------------
# The shipped configs and the documented contract


def test_embedded_default_loads() -> None:
    cfg = load_config(REPO / "conf" / "softswitch.yaml")
    assert cfg.domain == "127.0.0.1"
    assert [str(spec) for spec in cfg.listen] == ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
    assert cfg.http.address == ("127.0.0.1", 8080)
    assert cfg.data_dir == REPO / "conf" / "var"
    assert (cfg.media.ports.low, cfg.media.ports.high) == (20000, 20999)
    assert [(u.extension, u.name) for u in cfg.users] == [
        ("1001", "Alice Exec"),
        ("1002", "Bob Assistant"),
        ("1003", "Carol Assistant"),
        ("1004", "Dave Outsider"),
    ]
    assert cfg.user_by_number("+15550101004") == cfg.user("1004")
    assert cfg.delegates_of("1001") == (
        Delegate(extension="1002", permissions=ALL_PERMISSIONS),
        Delegate(extension="1003", permissions=frozenset({Permission.ANSWER, Permission.PICKUP})),
    )
    assert cfg.delegators_of("1003") == ("1001",)
    assert cfg.delegates_of("1004") == ()
    assert cfg.realm == "127.0.0.1"


def test_default_config_path_points_at_the_demo_config() -> None:
    path = default_config_path()
    assert path.is_file()
    assert path.resolve() == (REPO / "conf" / "softswitch.yaml").resolve()


def test_default_config_data_dir_is_under_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_default_config().data_dir == tmp_path / "var"
    assert load_default_config(data_dir_base=tmp_path / "x").data_dir == tmp_path / "x" / "var"


def test_large_example_loads() -> None:
    cfg = load_config(REPO / "conf" / "example-large.yaml")
    assert len(cfg.users) >= 20
    assert any(spec.host.version == 6 for spec in cfg.listen)
    assert cfg.trusted


def test_contract_example_loads() -> None:
    cfg = load(
        yaml("""
        domain: example.test              # SIP domain and digest realm
        listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]
        http: 127.0.0.1:8080              # HTTP API (later)
        data_dir: var
        media: {address: 127.0.0.1, ports: 20000-20999}
        users:
          - {extension: "1001", name: Alice Exec, password: secret1}
          - {extension: "1002", name: Bob Assistant, password: secret2}
        delegations:
          - {delegator: "1001", delegates: ["1002"]}
        """)
    )
    assert cfg.user("1001") == User(extension="1001", name="Alice Exec", password="secret1")
    assert cfg.user("9999") is None
    assert cfg.delegators_of("1002") == ("1001",)
    # Defaults of everything optional.
    assert cfg.policy.delegation is True
    assert cfg.lines.ring_time == 30
    assert cfg.ring_time_for("1001") == 30
    assert (cfg.registrar.min_expires, cfg.registrar.default_expires) == (60, 3600)
    assert cfg.registrar.max_expires == 7200
    # MD5 alone by default: baresip 1.0 and SIPp 3.6 fail on any SHA-256 challenge.
    assert cfg.auth.algorithms == (Algorithm.MD5,)
    assert (cfg.auth.nonce_ttl, cfg.auth.qop) == (300, "auth")
    assert (cfg.auth.max_failures, cfg.auth.failure_window, cfg.auth.block_time) == (10, 60, 60)
    assert cfg.realm == "example.test"
    assert cfg.trusted == []
    assert cfg.feature_codes.pickup == "*8"
    assert cfg.feature_codes.by_code()["*79"] == "dnd_off"
    assert (cfg.log.level, cfg.log.format) == ("info", "auto")
    assert cfg.max_message_size == 65535
    assert cfg.overload.max_queue_delay_ms == 500  # T1: the first retransmission is due
    assert cfg.data_dir == Path.cwd() / "var"


def test_config_is_frozen() -> None:
    cfg = load(HEAD + USERS)
    with pytest.raises(ValidationError):
        cfg.domain = "other.test"


def test_password_is_not_in_repr() -> None:
    cfg = load(HEAD + USERS)
    assert "secret1" not in repr(cfg.user("1001"))


def test_dialplan_imports_neither_softswitch_nor_media() -> None:
    code = (
        "import sys, dialplan\n"
        f"dialplan.load_config_text({HEAD + USERS!r})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('softswitch', 'media')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------
# Issue formatting


def test_issue_and_error_text() -> None:
    first = ConfigIssue("a.yaml", 3, "users[0].name", "must not be empty")
    second = ConfigIssue("a.yaml", None, "domain", "required key is missing")
    third = ConfigIssue("a.yaml", 2, "", "mapping values are not allowed here", column=5)
    assert str(first) == "a.yaml:3: users[0].name: must not be empty"
    assert str(second) == "a.yaml: domain: required key is missing"
    assert str(third) == "a.yaml:2:5: mapping values are not allowed here"
    error = ConfigError([first, second])
    assert error.issues == [first, second]
    assert str(error) == f"{first}\n{second}"


# --------------------------------------------------------------------------
# listen, http, media


def test_listen_forms() -> None:
    text = HEAD.replace(
        "listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]",
        yaml("""
        listen:
          - udp:127.0.0.1:5060
          - TCP:0.0.0.0:5070
          - udp:[::1]:5060
          - {transport: tcp, host: "::1", port: 5080}
        """).rstrip("\n"),
    )
    cfg = load(text + USERS)
    assert [(s.transport, s.host, s.port) for s in cfg.listen] == [
        ("udp", ipaddress.ip_address("127.0.0.1"), 5060),
        ("tcp", ipaddress.ip_address("0.0.0.0"), 5070),
        ("udp", ipaddress.ip_address("::1"), 5060),
        ("tcp", ipaddress.ip_address("::1"), 5080),
    ]
    assert str(cfg.listen[2]) == "udp:[::1]:5060"
    assert cfg.listen[2].address == ("::1", 5060)


@pytest.mark.parametrize(
    ("entry", "field", "fragment"),
    [
        ("udp:pbx.example.test:5060", "listen[1].host", "host name"),
        ("udp:localhost:5060", "listen[1].host", "does no DNS"),
        ("udp:::1:5060", "listen[1]", "brackets"),
        ("tls:127.0.0.1:5061", "listen[1].transport", "'udp' or 'tcp'"),
        ("udp:127.0.0.1", "listen[1]", "ADDRESS:PORT"),
        ("udp:127.0.0.1:70000", "listen[1].port", "less than or equal to 65535"),
        ("udp:127.0.0.1:sip", "listen[1].port", "valid integer"),
        ("udp:300.1.1.1:5060", "listen[1].host", "not a valid IPv4 or IPv6"),
        ("127.0.0.2:5060", "listen[1]", "TRANSPORT:ADDRESS:PORT"),
    ],
)
def test_listen_errors(entry: str, field: str, fragment: str) -> None:
    text = HEAD.replace(
        "listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]",
        f"listen:\n  - tcp:127.0.0.1:5060\n  - {entry}",
    )
    issue = problem(text + USERS)
    assert issue.field == field
    assert issue.line == line_of(text, entry)
    assert fragment in issue.message
    assert issue.file == SOURCE


def test_listen_must_not_be_empty() -> None:
    text = HEAD.replace("listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]", "listen: []")
    issue = problem(text + USERS)
    assert (issue.field, issue.line) == ("listen", 2)


def test_http_forms() -> None:
    cfg = load(HEAD.replace("http: 127.0.0.1:8080", 'http: "[::1]:8081"') + USERS)
    assert cfg.http.host == ipaddress.ip_address("::1")
    assert cfg.http.port == 8081
    assert str(cfg.http) == "[::1]:8081"
    issue = problem(HEAD.replace("http: 127.0.0.1:8080", "http: web.local:80") + USERS)
    assert (issue.field, issue.line) == ("http.host", 3)


@pytest.mark.parametrize(
    ("media", "field", "fragment"),
    [
        ("{address: 127.0.0.1, ports: 21000-20000}", "media.ports", "below the high port"),
        ("{address: 127.0.0.1, ports: 20000-20000}", "media.ports", "below the high port"),
        ("{address: 127.0.0.1, ports: 80-20000}", "media.ports.low", "greater than or equal"),
        ("{address: 127.0.0.1, ports: 20000}", "media.ports", "LOW-HIGH"),
        ("{address: 0.0.0.0, ports: 20000-20999}", "media.address", "SDP"),
        ("{address: media.local, ports: 20000-20999}", "media.address", "host name"),
        ("{address: 127.0.0.1}", "media.ports", "required key is missing"),
    ],
)
def test_media_errors(media: str, field: str, fragment: str) -> None:
    text = HEAD.replace("media: {address: 127.0.0.1, ports: 20000-20999}", f"media: {media}")
    issue = problem(text + USERS)
    assert (issue.field, issue.line) == (field, 5)
    assert fragment in issue.message


def test_media_ports_mapping_form_and_membership() -> None:
    text = HEAD.replace(
        "media: {address: 127.0.0.1, ports: 20000-20999}",
        "media: {address: 127.0.0.1, ports: {low: 30000, high: 30099}}",
    )
    ports = load(text + USERS).media.ports
    assert 30000 in ports and 30099 in ports and 30100 not in ports
    assert str(ports) == "30000-30099"


def test_socket_clashes() -> None:
    text = (
        yaml("""
        domain: example.test
        listen:
          - udp:127.0.0.1:5060
          - udp:127.0.0.1:5060
          - tcp:0.0.0.0:8080
          - udp:127.0.0.1:20002
        http: 127.0.0.1:8080
        media: {address: 127.0.0.1, ports: 20000-20999}
        """)
        + USERS
    )
    issues = problems(text)
    assert [(i.field, i.line) for i in issues] == [
        ("listen[1]", 4),
        ("http", line_of(text, "http:")),
        ("media.ports", line_of(text, "media:")),
    ]
    assert "already listed at line 3" in issues[0].message
    assert "tcp:0.0.0.0:8080 at line 5" in issues[1].message
    assert "at line 6" in issues[2].message


# --------------------------------------------------------------------------
# data_dir


def test_data_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "softswitch.yaml"
    path.parent.mkdir()
    path.write_text(HEAD + USERS)
    assert load_config(path).data_dir == tmp_path / "etc" / "var"
    assert load_config(str(path), data_dir_base=tmp_path).data_dir == tmp_path / "var"


def test_data_dir_absolute_and_text_base(tmp_path: Path) -> None:
    absolute = HEAD.replace("data_dir: var", f"data_dir: {tmp_path / 'data'}") + USERS
    assert load(absolute).data_dir == tmp_path / "data"
    relative = HEAD + USERS
    assert load_config_text(relative, base_dir=tmp_path).data_dir == tmp_path / "var"


def test_data_dir_must_not_be_empty() -> None:
    issue = problem(HEAD.replace("data_dir: var", 'data_dir: ""') + USERS)
    assert (issue.field, issue.line) == ("data_dir", 4)


# --------------------------------------------------------------------------
# Users


def test_user_optional_fields() -> None:
    cfg = load(
        with_users(
            '{extension: "1001", name: A, password: p, number: "+15550101001", dnd: true}',
            '{extension: "1002", name: B, password: p, voicemail: true}',
        )
    )
    alice, bob = cfg.users
    assert (alice.number, alice.dnd, alice.voicemail) == ("+15550101001", True, False)
    assert (bob.number, bob.dnd, bob.voicemail) == (None, False, True)
    assert cfg.user_by_number("+15550101001") is alice
    assert cfg.user_by_number("+15550101002") is None


def test_unquoted_integer_extension_and_password_are_accepted() -> None:
    cfg = load(with_users("{extension: 1001, name: A, password: 1234}"))
    assert cfg.users[0].extension == "1001"
    assert cfg.users[0].password == "1234"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0123", "quotes"),  # YAML would read 123
        ("1_001", "quotes"),
        ("0x1F", "quotes"),
        ('"12a4"', "1 to 16 digits"),
        ('"12345678901234567"', "1 to 16 digits"),
        ('""', "1 to 16 digits"),
        ("-1001", "1 to 16 digits"),
        ("true", "boolean"),
    ],
)
def test_bad_extensions(value: str, fragment: str) -> None:
    text = with_users(f"{{extension: {value}, name: A, password: p}}")
    issue = problem(text)
    assert (issue.field, issue.line) == ("users[0].extension", line_of(text, "name: A"))
    assert fragment in issue.message


def test_quoted_extension_keeps_leading_zero() -> None:
    assert load(with_users('{extension: "0123", name: A, password: p}')).user("0123") is not None


def test_duplicate_extension_points_at_second_occurrence() -> None:
    text = with_users(
        '{extension: "1001", name: A, password: p}',
        '{extension: "1002", name: B, password: p}',
        '{extension: "1001", name: C, password: p}',
    )
    issue = problem(text)
    assert issue.field == "users[2].extension"
    assert issue.line == line_of(text, "name: C")
    assert f"at line {line_of(text, 'name: A')}" in issue.message
    assert str(issue).startswith(f"{SOURCE}:{issue.line}: users[2].extension: ")


def test_duplicate_number() -> None:
    text = with_users(
        '{extension: "1001", name: A, password: p, number: "+15550101001"}',
        '{extension: "1002", name: B, password: p, number: "+15550101001"}',
    )
    issue = problem(text)
    assert (issue.field, issue.line) == ("users[1].number", line_of(text, "name: B"))
    assert "+15550101001" in issue.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("+15550101001", "quotes"),  # unquoted: YAML drops the '+'
        ('"15550101001"', "E.164"),
        ('"+0555"', "E.164"),
        ('"+1234567890123456"', "E.164"),
    ],
)
def test_bad_numbers(value: str, fragment: str) -> None:
    text = with_users(f'{{extension: "1001", name: A, password: p, number: {value}}}')
    issue = problem(text)
    assert (issue.field, issue.line) == ("users[0].number", 7)
    assert fragment in issue.message


def test_block_style_missing_and_empty_fields() -> None:
    text = HEAD + yaml("""
        users:
          - extension: "1001"
            name: "  "
          - extension: "1002"
            name: "Bob\\nInjected: header"
            password: p
        """)
    issues = problems(text)
    assert [(i.field, i.line) for i in issues] == [
        ("users[0].password", line_of(text, 'extension: "1001"')),
        ("users[0].name", line_of(text, 'name: "  "')),
        ("users[1].name", line_of(text, "Injected")),
    ]
    assert issues[0].message == "required key is missing"
    assert "empty" in issues[1].message
    assert "control characters" in issues[2].message


def test_value_on_the_line_after_its_key() -> None:
    text = HEAD + yaml("""
        users:
          - extension: "1001"
            name: A
            password:
              [not, a, string]
        """)
    issue = problem(text)
    assert (issue.field, issue.line) == ("users[0].password", line_of(text, "password:"))
    assert "not" not in issue.message  # passwords are never echoed


def test_password_values_are_not_echoed() -> None:
    issue = problem(with_users('{extension: "1001", name: A, password: 1.5}'))
    assert issue.field == "users[0].password"
    assert "1.5" not in issue.message


def test_missing_users_and_domain_have_no_line() -> None:
    issues = problems(HEAD.replace("domain: example.test\n", ""))
    assert [(i.field, i.line) for i in issues] == [("domain", None), ("users", None)]
    assert str(issues[0]) == f"{SOURCE}: domain: required key is missing"


# --------------------------------------------------------------------------
# Delegations


def delegations(*lines: str) -> str:
    return HEAD + USERS + "delegations:\n" + "".join(f"  - {line}\n" for line in lines)


def test_both_delegate_forms_normalise_to_delegate() -> None:
    cfg = load(
        delegations(
            '{delegator: "1001", delegates: ["1002", 1003]}',
            yaml("""
            delegator: "1002"
                delegates:
                  - extension: "1003"
                    permissions: [place, answer, pickup, voicemail]
                  - {extension: "1001", permissions: [pickup], ring_delay: 5}
                ring_time: 45
            """).rstrip("\n"),
        )
    )
    assert cfg.delegates_of("1001") == (
        Delegate(extension="1002", permissions=ALL_PERMISSIONS, ring_delay=0),
        Delegate(extension="1003", permissions=ALL_PERMISSIONS, ring_delay=0),
    )
    carol, alice = cfg.delegates_of("1002")
    assert carol.permissions == ALL_PERMISSIONS
    assert alice.permissions == frozenset({Permission.PICKUP})
    assert alice.can(Permission.PICKUP) and not alice.can(Permission.PLACE)
    assert alice.ring_delay == 5
    assert isinstance(alice.permissions, frozenset)
    assert cfg.delegators_of("1003") == ("1001", "1002")
    assert cfg.ring_time_for("1002") == 45
    assert cfg.ring_time_for("1001") == 30
    delegation = cfg.delegation_of("1002")
    assert delegation is not None and delegation.ring_time == 45


def test_unknown_delegator() -> None:
    text = delegations('{delegator: "1009", delegates: ["1002"]}')
    issue = problem(text)
    assert (issue.field, issue.line) == ("delegations[0].delegator", line_of(text, "1009"))
    assert "unknown delegator 1009" in issue.message


def test_unknown_delegate_in_both_forms() -> None:
    text = delegations(
        '{delegator: "1001", delegates: ["1008"]}',
        yaml("""
        delegator: "1002"
            delegates:
              - extension: "1009"
                permissions: [answer]
        """).rstrip("\n"),
    )
    issues = problems(text)
    assert [(i.field, i.line) for i in issues] == [
        ("delegations[0].delegates[0].extension", line_of(text, "1008")),
        ("delegations[1].delegates[0].extension", line_of(text, "1009")),
    ]
    assert all("unknown delegate" in i.message for i in issues)


def test_self_delegation() -> None:
    text = delegations('{delegator: "1001", delegates: ["1002", "1001"]}')
    issue = problem(text)
    assert (issue.field, issue.line) == ("delegations[0].delegates[1].extension", 11)
    assert "own delegate" in issue.message


def test_duplicate_delegate_in_one_delegation() -> None:
    text = (
        HEAD
        + USERS
        + yaml("""
        delegations:
          - delegator: "1001"
            delegates:
              - "1002"
              - "1003"
              - {extension: "1002", permissions: [answer]}
        """)
    )
    issue = problem(text)
    assert issue.field == "delegations[0].delegates[2].extension"
    assert issue.line == line_of(text, "permissions: [answer]")
    first = line_of(text, '- "1002"')
    assert f"at line {first}" in issue.message


def test_delegator_listed_twice_is_an_error() -> None:
    text = delegations(
        '{delegator: "1001", delegates: ["1002"]}',
        '{delegator: "1001", delegates: ["1003"]}',
    )
    issue = problem(text)
    assert (issue.field, issue.line) == ("delegations[1].delegator", 12)
    assert "delegator 1001 already has a delegation at line 11" in issue.message


def many_users(count: int) -> str:
    return (
        HEAD
        + "users:\n"
        + "".join(
            f'  - {{extension: "{2000 + n}", name: U{n}, password: p}}\n' for n in range(count)
        )
    )


def test_too_many_delegates() -> None:
    delegates = ", ".join(f'"{2001 + n}"' for n in range(MAX_DELEGATES + 1))
    text = (
        many_users(MAX_DELEGATES + 2)
        + f'delegations:\n  - {{delegator: "2000", delegates: [{delegates}]}}\n'
    )
    issue = problem(text)
    assert (issue.field, issue.line) == ("delegations[0].delegates", line_of(text, "delegator"))
    assert f"at most {MAX_DELEGATES}" in issue.message


def test_exactly_the_limit_of_delegates_is_fine() -> None:
    delegates = ", ".join(f'"{2001 + n}"' for n in range(MAX_DELEGATES))
    text = (
        many_users(MAX_DELEGATES + 1)
        + f'delegations:\n  - {{delegator: "2000", delegates: [{delegates}]}}\n'
    )
    assert len(load(text).delegates_of("2000")) == MAX_DELEGATES


def test_too_many_delegators() -> None:
    text = (
        many_users(MAX_DELEGATORS + 2)
        + "delegations:\n"
        + "".join(
            f'  - {{delegator: "{2001 + n}", delegates: ["2000"]}}\n'
            for n in range(MAX_DELEGATORS + 1)
        )
    )
    issue = problem(text)
    last = line_of(text, f'delegator: "{2001 + MAX_DELEGATORS}"')
    assert (issue.field, issue.line) == (
        f"delegations[{MAX_DELEGATORS}].delegates[0].extension",
        last,
    )
    assert f"more than {MAX_DELEGATORS} delegators" in issue.message
    assert len(load(text.replace(text.splitlines()[-1] + "\n", "")).delegators_of("2000")) == 15


@pytest.mark.parametrize(
    ("delegation", "field", "fragment"),
    [
        ('{delegator: "1001", delegates: []}', "delegations[0].delegates", "at least one"),
        ('{delegator: "1001"}', "delegations[0].delegates", "required key is missing"),
        (
            '{delegator: "1001", delegates: [{extension: "1002", permissions: []}]}',
            "delegations[0].delegates[0].permissions",
            "at least one permission",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", permissions: [answer, fly]}]}',
            "delegations[0].delegates[0].permissions[1]",
            "'place', 'answer', 'pickup' or 'voicemail'",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", permissions: [answer, answer]}]}',
            "delegations[0].delegates[0].permissions",
            "listed twice",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", ring_delay: -1}]}',
            "delegations[0].delegates[0].ring_delay",
            "greater than or equal to 0",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", ring_delay: 1.5}]}',
            "delegations[0].delegates[0].ring_delay",
            "valid integer",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", ring_delay: 30}]}',
            "delegations[0].delegates[0].ring_delay",
            "never ring",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", ring_delay: 10}], ring_time: 10}',
            "delegations[0].delegates[0].ring_delay",
            "never ring",
        ),
        (
            '{delegator: "1001", delegates: ["1002"], ring_time: 601}',
            "delegations[0].ring_time",
            "less than or equal to 600",
        ),
        (
            '{delegator: "1001", delegates: [{extension: "1002", permision: [answer]}]}',
            "delegations[0].delegates[0].permision",
            "did you mean 'permissions'?",
        ),
        (
            '{delegator: "1001", delegates: [["1002"]]}',
            "delegations[0].delegates[0]",
            "a delegate is an extension",
        ),
    ],
)
def test_delegation_field_errors(delegation: str, field: str, fragment: str) -> None:
    text = delegations(delegation)
    issue = problem(text)
    assert (issue.field, issue.line) == (field, 11)
    assert fragment in issue.message


def test_policy_can_switch_delegation_off() -> None:
    assert load(HEAD + USERS + "policy: {delegation: false}\n").policy.delegation is False


# --------------------------------------------------------------------------
# Settings sections


def test_settings_sections() -> None:
    text = (
        HEAD
        + USERS
        + yaml("""
        lines: {ring_time: 20}
        registrar: {min_expires: 30, max_expires: 600, default_expires: 300}
        auth:
          realm: voice.example.test
          algorithms: [md5]
          nonce_ttl: 60
          max_failures: 3
          failure_window: 10
          block_time: 0
        trusted: [127.0.0.2/32, "::1", 10.0.0.0/8]
        feature_codes: {pickup: "#8", dnd_on: "*780"}
        log: {level: DEBUG, format: json}
        overload: {max_queue_delay_ms: 0}
        tcp: {max_connections: 100, message_timeout: 5}
        max_message_size: 4096
        """)
    )
    cfg = load(text)
    assert cfg.lines.ring_time == 20
    assert cfg.registrar.default_expires == 300
    assert cfg.realm == "voice.example.test"
    assert cfg.auth.algorithms == (Algorithm.MD5,)
    assert cfg.auth.block_time == 0
    assert cfg.trusted == [
        ipaddress.ip_network("127.0.0.2/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/8"),
    ]
    assert cfg.is_trusted("127.0.0.2") and cfg.is_trusted("10.9.8.7")
    assert cfg.is_trusted("::ffff:127.0.0.2")  # IPv4 peer on a dual-stack socket
    assert not cfg.is_trusted("127.0.0.1")
    assert cfg.feature_codes.pickup == "#8"
    assert cfg.feature_codes.dnd_on == "*780"
    assert cfg.feature_codes.by_code()["#8"] == "pickup"
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")
    assert cfg.max_message_size == 4096
    assert cfg.overload.max_queue_delay_ms == 0
    assert (cfg.tcp.max_connections, cfg.tcp.message_timeout) == (100, 5)


@pytest.mark.parametrize(
    ("section", "field", "fragment"),
    [
        ("lines: {ring_time: 0}", "lines.ring_time", "greater than or equal to 1"),
        ("lines: {ring_time: 601}", "lines.ring_time", "less than or equal to 600"),
        ('lines: {ring_time: "30"}', "lines.ring_time", "valid integer"),
        ("lines: {ring_time: true}", "lines.ring_time", "valid integer"),
        ("registrar: {min_expires: 5000}", "registrar.default_expires", "between"),
        ("registrar: {max_expires: 30}", "registrar.max_expires", "below min_expires"),
        ("registrar: {default_expires: 10}", "registrar.default_expires", "between"),
        ("auth: {algorithms: [SHA-512]}", "auth.algorithms[0]", "'MD5' or 'SHA-256'"),
        ("auth: {algorithms: [MD5, md5]}", "auth.algorithms", "listed twice"),
        ("auth: {algorithms: []}", "auth.algorithms", "at least one algorithm"),
        ("auth: {qop: auth-int}", "auth.qop", "'auth'"),
        ("auth: {realm: 'a\"b'}", "auth.realm", "must not contain"),
        ("auth: {max_failures: 0}", "auth.max_failures", "greater than or equal to 1"),
        ("trusted: [10.0.0.1/8]", "trusted[0]", "host bits set"),
        ("trusted: [office]", "trusted[0]", "not a network"),
        ('feature_codes: {retrieve: "*8"}', "feature_codes.retrieve", "already used by pickup"),
        ('feature_codes: {pickup: "*9"}', "feature_codes.retrieve", "already used by pickup"),
        ('feature_codes: {pickup: "8"}', "feature_codes.pickup", "'*' or '#'"),
        ("feature_codes:\n  dnd_on: #78", "feature_codes.dnd_on", "quotes"),
        ('feature_codes: {park: "*5"}', "feature_codes.park", "unknown key 'park'"),
        ("log: {level: loud}", "log.level", "(got 'loud')"),
        ("log: {format: xml}", "log.format", "'auto', 'json' or 'console'"),
        ("max_message_size: 100", "max_message_size", "greater than or equal to 1024"),
        ("tcp: {max_connections: 0}", "tcp.max_connections", "greater than or equal to 1"),
        ("tcp: {message_timeout: 0}", "tcp.message_timeout", "greater than or equal to 1"),
        (
            "overload: {max_queue_delay_ms: -1}",
            "overload.max_queue_delay_ms",
            "greater than or equal to 0",
        ),
        ("policy: {delegation: maybe}", "policy.delegation", "valid boolean"),
    ],
)
def test_settings_errors(section: str, field: str, fragment: str) -> None:
    text = HEAD + USERS + section + "\n"
    issue = problem(text)
    assert (issue.field, issue.line) == (field, line_of(text, section.splitlines()[-1]))
    assert fragment in issue.message


# --------------------------------------------------------------------------
# Unknown keys


def test_unknown_keys_everywhere_with_their_lines() -> None:
    text = HEAD + yaml("""
        users:
          - extension: "1001"
            name: A
            password: p
            colour: red
        lines:
          ring_tme: 20
        regsitrar: {}
        """)
    issues = problems(text)
    assert [(i.field, i.line) for i in issues] == [
        ("users[0].colour", line_of(text, "colour")),
        ("lines.ring_tme", line_of(text, "ring_tme")),
        ("regsitrar", line_of(text, "regsitrar")),
    ]
    assert "unknown key 'colour'; expected one of: extension, name, password" in issues[0].message
    assert "did you mean 'ring_time'?" in issues[1].message
    assert "did you mean 'registrar'?" in issues[2].message


def test_unknown_key_whose_value_is_a_block() -> None:
    text = HEAD + USERS + "extras:\n  a: 1\n  b: 2\n"
    issue = problem(text)
    assert (issue.field, issue.line) == ("extras", line_of(text, "extras:"))


def test_non_string_key() -> None:
    text = HEAD + USERS + "5060: udp\n"
    issue = problem(text)
    assert issue.line == line_of(text, "5060: udp")


# --------------------------------------------------------------------------
# YAML itself


def test_yaml_syntax_error_has_line_and_column() -> None:
    text = HEAD + 'users:\n  - {extension: "1001", name: A, password: p\n'
    issue = problem(text)
    assert issue.field == ""
    assert issue.line == 8
    assert issue.column is not None
    assert str(issue).startswith(f"{SOURCE}:8:{issue.column}: ")
    assert "flow mapping" in issue.message


def test_yaml_bad_indentation() -> None:
    text = "domain: example.test\nmedia:\n  address: 127.0.0.1\n ports: 20000-20999\n"
    issue = problem(text)
    assert (issue.line, issue.column) == (4, 2)
    assert "starting at line 1" in issue.message


def test_yaml_duplicate_key_does_not_echo_values() -> None:
    text = HEAD + USERS.replace("password: secret1", "password: secret1, password: hunter2")
    issue = problem(text)
    assert issue.line == line_of(text, "hunter2")
    assert 'duplicate key "password"' in issue.message
    assert "hunter2" not in issue.message and "secret1" not in issue.message


def test_yaml_unquoted_star_code_hint() -> None:
    issue = problem(HEAD + USERS + "feature_codes: {pickup: *8}\n")
    assert issue.line == 10
    assert 'quoted, e.g. "*8"' in issue.message


def test_yaml_custom_tag_is_refused() -> None:
    text = HEAD + USERS + "lines: !fancy {ring_time: 30}\n"
    issue = problem(text)
    assert (issue.field, issue.line) == ("lines", 10)
    assert "!fancy" in issue.message


def test_yaml_standard_str_tag_is_fine() -> None:
    cfg = load(with_users("{extension: !!str 0123, name: A, password: p}"))
    assert cfg.users[0].extension == "0123"


def test_yaml_merge_keys_work() -> None:
    text = HEAD + yaml("""
        users:
          - &base {extension: "1001", name: A, password: p}
          - <<: *base
            extension: "1002"
        """)
    assert [u.extension for u in load(text).users] == ["1001", "1002"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty document"), ("# nothing\n", "empty document"), ("- a\n- b\n", "a list")],
)
def test_document_must_be_a_mapping(text: str, fragment: str) -> None:
    issue = problem(text)
    assert "must be a mapping" in issue.message
    assert fragment in issue.message


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    (issue,) = caught.value.issues
    assert (issue.file, issue.line) == (str(missing), None)
    assert "cannot read" in issue.message

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"domain: example.test\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert [(i.line, i.message) for i in caught.value.issues] == [
        (2, "the file is not valid UTF-8")
    ]


# --------------------------------------------------------------------------
# All errors at once


def test_all_errors_are_collected_and_sorted_by_line() -> None:
    text = yaml("""
        domain: example.test
        listen: [udp:127.0.0.1:5060]
        media: {address: 127.0.0.1, ports: 20000-20999}
        users:
          - {extension: "1001", name: A, password: p}
          - {extension: "1002", name: B, password: p, nickname: bee}
          - {extension: "1001", name: C, password: p}
        delegations:
          - {delegator: "1001", delegates: ["1003"]}
          - {delegator: "1003", delegates: ["1001"]}
        lines: {ring_time: forever}
        """)
    issues = problems(text)
    assert [(i.line, i.field) for i in issues] == [
        (line_of(text, "nickname"), "users[1].nickname"),
        (line_of(text, "name: C"), "users[2].extension"),
        (line_of(text, 'delegates: ["1003"]'), "delegations[0].delegates[0].extension"),
        (line_of(text, 'delegator: "1003"'), "delegations[1].delegator"),
        (line_of(text, "ring_time"), "lines.ring_time"),
    ]


def test_cross_checks_still_run_when_a_section_is_invalid() -> None:
    # The listen entry is broken, yet the duplicate extension is reported too.
    text = HEAD.replace("udp:127.0.0.1:5060, ", "udp:127.0.0.1:0, ") + with_users(
        '{extension: "1001", name: A, password: p}',
        '{extension: "1001", name: B, password: p}',
    ).removeprefix(HEAD)
    issues = problems(text)
    assert [i.field for i in issues] == ["listen[0].port", "users[1].extension"]


# --------------------------------------------------------------------------
# Config built in code


def test_config_built_in_code_runs_the_cross_checks() -> None:
    fields = {
        "domain": "example.test",
        "listen": ["udp:127.0.0.1:5060"],
        "media": {"address": "127.0.0.1", "ports": "20000-20999"},
        "users": [
            {"extension": "1001", "name": "A", "password": "p"},
            {"extension": "1001", "name": "B", "password": "p"},
        ],
    }
    with pytest.raises(ValidationError, match=r"users\[1\]\.extension: .* at users\[0\]"):
        Config.model_validate(fields)
    fields["users"] = fields["users"][:1]  # type: ignore[index]
    cfg = Config.model_validate(fields)
    assert cfg.user("1001") is not None
    assert cfg.data_dir == Path.cwd() / "var"


def test_domain_forms() -> None:
    assert load(HEAD.replace("example.test", "PBX.Example.Test.") + USERS).domain == (
        "pbx.example.test"
    )
    assert load(HEAD.replace("example.test", '"[::1]"') + USERS).domain == "[::1]"
    issue = problem(HEAD.replace("example.test", "bad_domain!") + USERS)
    assert (issue.field, issue.line) == ("domain", 1)


def test_sha256_can_be_offered_first() -> None:
    cfg = load_config_text(
        "domain: example.test\nlisten: [udp:127.0.0.1:5060]\n"
        "media: {address: 127.0.0.1, ports: 20000-20999}\n"
        'users: [{extension: "1001", name: A, password: p}]\n'
        "auth: {algorithms: [SHA-256, MD5]}\n"
    )
    assert cfg.auth.algorithms == (Algorithm.SHA_256, Algorithm.MD5)
