"""The fast YAML path (dialplan.fastyaml): same data as the round-trip loader, or none at all.

A config the fast reader accepts must give exactly the values *and types* the round-trip
loader gives (an int subclass is how the extension validator spots ``0123``), otherwise the
two paths would accept different configs. Anything it does not mirror must make it give up.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from dialplan import ConfigError, fastyaml, load_config, load_config_text, loader

pytestmark = pytest.mark.skipif(not fastyaml.AVAILABLE, reason="PyYAML's libyaml is missing")

REPO = Path(__file__).resolve().parents[2]

HEAD = """\
domain: example.test
listen: [udp:127.0.0.1:5060, tcp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
"""


def slow_plain(text: str) -> Any:
    tree = loader._parse_yaml(text, "t.yaml")
    issues: list[Any] = []
    data = loader._to_plain(tree, (), tree, "t.yaml", issues)
    assert not issues
    return data


def typed(value: Any) -> Any:
    """``value`` with the type of every leaf, so that 1 == True and ScalarInt(0) == 0 differ."""
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value), value)


SAME = [
    "a: 1\nb: -7\nc: +3\nd: 0\ne: 007\nf: -0\n",
    "t: [true, True, TRUE, false, False, FALSE]\n",
    "y: [yes, no, on, off, y, n, Yes]\n",  # YAML 1.2: strings, unlike libyaml's 1.1 rules
    "n: [~, null, Null, NULL, '', ]\nm:\nk: {x: }\n",
    "s: ['1', \"2\", plain text, 'it''s', \"tab\\tnl\\n\", a#b, 'x # y']  # comment\n",
    "b: |\n  line one\n  line two\nf: >-\n  folded\n  text\n",
    "m:\n  - x: 1\n    y:\n      - 1\n      - two\n  - {p: q, r: [s]}\n",
    'long: this is\n  a multi-line\n  plain scalar\nq: "and a\n  quoted one"\n',
    "ext: 1001\nnum: '+15550101001'\ncode: '*8'\nhash: '#78'\nstar: a*b\n",
    "w: word&word\nx: 'quoted&!bang'\nz: 1e3x\nv: 12abc\n",
    "---\na: 1\n...\n",
]


@pytest.mark.parametrize("text", SAME)
def test_fast_reader_matches_round_trip(text: str) -> None:
    assert typed(fastyaml.read_plain(text)) == typed(slow_plain(text))


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_fast_reader_matches_round_trip_on_shipped_configs(path: Path) -> None:
    text = path.read_text()
    assert typed(fastyaml.read_plain(text)) == typed(slow_plain(text))


UNSUPPORTED = [
    "a: &x 1\n",  # an anchored int is a ScalarInt in the round-trip tree
    "a: [1, &x 2]\nb: *x\n",
    "a: !!str 1\n",
    "a: ! 1\n",
    "a: !custom x\n",
    "%YAML 1.1\n---\na: yes\n",
    "a:\t1\n",
    "\ufeffa: 1\n",
    "a: 1.5\n",
    "a: 1e3\n",
    "a: .inf\n",
    "a: 1_000\n",
    "a: 0x1F\n",
    "a: 0o17\n",
    "a: 2026-11-27\n",
    "<<: {a: 1}\n",
    "a: 1\na: 2\n",
    "1: a\n",
    "[a]: b\n",
    "a: [1\n",
    "a: 1\n---\nb: 2\n",
    "",
    "# only a comment\n",
    "a: x\x85y\n",
]


@pytest.mark.parametrize("text", UNSUPPORTED)
def test_fast_reader_gives_up_on_what_it_does_not_mirror(text: str) -> None:
    with pytest.raises(fastyaml.Unsupported):
        fastyaml.read_plain(text)


def users(count: int) -> str:
    return (
        HEAD
        + "users:\n"
        + "".join(
            f'  - {{extension: "{n}", name: User {n}, password: pw{n}}}\n'
            for n in range(200000, 200000 + count)
        )
    )


def test_valid_config_never_reaches_the_round_trip_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loader, "_parse_yaml", _refuse)
    assert len(load_config_text(users(500)).users) == 500
    assert load_config(REPO / "conf" / "softswitch.yaml").user("1001") is not None


def test_both_paths_build_the_same_config(monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "conf" / "example-large.yaml"
    fast = load_config(path)
    monkeypatch.setattr(fastyaml, "read_plain", _unsupported)
    assert load_config(path) == fast


def _unsupported(text: str) -> Any:
    raise fastyaml.Unsupported


def _refuse(text: str, source: str) -> Any:
    raise AssertionError("the round-trip parser ran for valid YAML")


def test_invalid_users_do_not_hide_the_valid_ones_from_the_checks() -> None:
    text = users(6)
    text = text.replace("pw200001}", "pw200001, x: 1}").replace('"200004"', '"4x"')
    text = text.replace('"200005"', '"200002"')
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, source="t.yaml")
    assert [(issue.line, issue.field) for issue in caught.value.issues] == [
        (6, "users[1].x"),
        (9, "users[4].extension"),
        (10, "users[5].extension"),
    ]
    assert "already used by the user at line 7" in caught.value.issues[2].message


def test_an_invalid_large_config_is_reported_with_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_parse_yaml", _refuse)  # libyaml's marks give the lines
    text = users(300) + textwrap.dedent("""\
        delegations:
          - {delegator: "200000", delegates: ["200001", "999"]}
        """)
    text = text.replace("pw200007}", "pw200007, ring: 3}")
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, source="big.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        "big.yaml:12: users[7].ring: unknown key 'ring'; expected one of: "
        "extension, name, password, number, dnd, voicemail",
        "big.yaml:306: delegations[0].delegates[1].extension: unknown delegate 999: no user has it",
    ]


def test_gc_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    assert gc.isenabled()
    load_config_text(users(3))
    assert gc.isenabled()
    with pytest.raises(ConfigError):
        load_config_text(users(3) + "bogus: 1\n")
    assert gc.isenabled()
    gc.disable()
    try:
        load_config_text(users(3))
        assert not gc.isenabled()
    finally:
        gc.enable()


LAYOUTS = [
    *SAME,
    "users:\n  - extension: '1'\n    name:\n      Ann\n    password: >\n      p\n  -\n    x: 1\n",
    "a:\n  # comment\n  b: [1,\n     2, {c: d,\n         e: f}]\n  g: {h:\n     i}\n",
    "'quoted key': 1\n\"k2\": {\"x\": [a, 'b']}\nempty:\nnext: ~\n",
    "list:\n- a\n-   b\n- - c\n  - d\n-\n  - e\n",
    "top: |\n  keep\n\n  this\nafter: 1\n",
]


def paths(value: Any, loc: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``value``, plus a missing key and index under each collection."""
    found = [loc]
    if isinstance(value, dict):
        found += [(*loc, "missing"), (*loc, 0)]
        for key, child in value.items():
            found += paths(child, (*loc, key))
    elif isinstance(value, list):
        found += [(*loc, len(value)), (*loc, "key")]
        for i, child in enumerate(value):
            found += paths(child, (*loc, i))
    return found


@pytest.mark.parametrize(
    "text",
    LAYOUTS + [p.read_text() for p in sorted((REPO / "conf").glob("*.yaml"))],
)
def test_lines_match_the_round_trip_tree(text: str) -> None:
    tree = loader._parse_yaml(text, "t.yaml")
    document = fastyaml.read(text)
    for loc in paths(document.data):
        for key_line in (False, True):
            expected = loader._line_of(tree, loc, key_line=key_line)
            assert document.line_of(loc, key_line=key_line) == expected, (loc, key_line)
