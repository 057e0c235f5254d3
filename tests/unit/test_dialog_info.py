"""Dialog-info documents (RFC 4235): what a BLF key or shared-line appearance is drawn from.

Every document is parsed back with ElementTree, as a phone would.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from softswitch.dialog_info import document, render, sip_uri
from softswitch.lines import CallState, Direction, LineCall, LineEvent

NS = {"d": "urn:ietf:params:xml:ns:dialog-info", "sa": "urn:ietf:params:xml:ns:sa-dialog-info"}
DOMAIN = "127.0.0.1"
NAMES = {"1001": "Alice Exec", "1002": "Bob Assistant"}
T0 = 1_800_000_000.0


def call(
    state: CallState,
    party: str | None = "1002",
    *,
    direction: Direction = Direction.INBOUND,
    remote: str = "1004",
    remote_name: str | None = "Dave",
    dialog: tuple[str, str, str] | None = ("leg@h", "phone", "ours"),
    private: bool = False,
    call_id: str = "c1",
) -> LineCall:
    return LineCall(call_id, state, direction, party, remote, remote_name, T0, T0, dialog, private)


def ended(reason: str | None, call_id: str = "c1") -> LineEvent:
    return LineEvent(
        "1001",
        call_id,
        CallState.ENDED,
        Direction.INBOUND,
        "1002",
        "1004",
        "Dave",
        T0,
        T0 + 9,
        reason,
        dialog=("leg@h", "phone", "ours"),
    )


def parse(body: bytes) -> ET.Element:
    root = ET.fromstring(body)
    assert root.tag == f"{{{NS['d']}}}dialog-info"
    return root


def dialogs(root: ET.Element) -> list[ET.Element]:
    return root.findall("d:dialog", NS)


def test_idle_line_is_a_full_document_without_dialogs() -> None:
    root = parse(render("1001", 0, [], DOMAIN, T0))
    assert root.attrib == {"version": "0", "state": "full", "entity": "sip:1001@127.0.0.1"}
    assert dialogs(root) == []


def test_ringing_is_early_with_no_local_party_yet() -> None:
    root = parse(
        render("1001", 4, [call(CallState.RINGING, None, dialog=("leg@h", "", "ours"))], DOMAIN, T0)
    )
    (d,) = dialogs(root)
    assert d.attrib == {
        "id": "c1",
        "call-id": "leg@h",
        "remote-tag": "ours",  # the phone's tag is unknown until it answers: omitted
        "direction": "recipient",
    }
    assert d.findtext("d:state", namespaces=NS) == "early"
    assert d.find("d:local", NS) is None
    assert d.findtext("d:remote/d:identity", namespaces=NS) == "sip:1004@127.0.0.1"
    assert d.find("d:remote/d:identity[@display='Dave']", NS) is not None


def test_confirmed_shows_the_delegate_using_the_line_and_the_caller() -> None:
    root = parse(render("1001", 1, [call(CallState.ACTIVE)], DOMAIN, T0 + 42.7, names=NAMES))
    (d,) = dialogs(root)
    assert d.get("local-tag") == "phone" and d.get("remote-tag") == "ours"
    assert d.findtext("d:state", namespaces=NS) == "confirmed"
    assert d.findtext("d:duration", namespaces=NS) == "42"
    identity = d.find("d:local/d:identity", NS)
    assert identity is not None and identity.text == "sip:1002@127.0.0.1"
    assert identity.get("display") == "Bob Assistant"
    target = d.find("d:local/d:target", NS)
    assert target is not None and target.get("uri") == "sip:1002@127.0.0.1"
    param = target.find("d:param", NS)
    assert param is not None and param.get("pname") == "+sip.rendering"
    assert param.get("pval") == param.get("pvalue") == "yes"
    assert d.find("d:remote/d:target[@uri='sip:1004@127.0.0.1']", NS) is not None
    assert d.findtext("sa:exclusive", namespaces=NS) == "false"


def test_children_follow_the_schema_order() -> None:
    root = parse(render("1001", 1, [call(CallState.ACTIVE)], DOMAIN, T0))
    (d,) = dialogs(root)
    assert [c.tag.split("}")[1] for c in d] == [
        "state",
        "duration",
        "local",
        "remote",
        "exclusive",
    ]


def test_held_call_is_confirmed_and_not_rendering() -> None:
    root = parse(render("1001", 2, [call(CallState.HELD)], DOMAIN, T0))
    (d,) = dialogs(root)
    assert d.findtext("d:state", namespaces=NS) == "confirmed"
    param = d.find("d:local/d:target/d:param", NS)
    assert param is not None and param.get("pval") == "no" and param.get("pvalue") == "no"
    assert d.findtext("sa:exclusive", namespaces=NS) == "false"


def test_private_hold_is_exclusive() -> None:
    root = parse(render("1001", 2, [call(CallState.HELD, private=True)], DOMAIN, T0))
    assert dialogs(root)[0].findtext("sa:exclusive", namespaces=NS) == "true"


def test_outbound_call_is_initiator() -> None:
    c = call(CallState.DIALING, "1001", direction=Direction.OUTBOUND, remote="+15551234")
    (d,) = dialogs(parse(render("1001", 0, [c], DOMAIN, T0)))
    assert d.get("direction") == "initiator"
    assert d.findtext("d:state", namespaces=NS) == "early"
    assert d.findtext("d:remote/d:identity", namespaces=NS) == "sip:+15551234@127.0.0.1"
    assert d.find("d:local/d:target/d:param", NS) is None  # no media yet: no rendering claim


def test_terminated_with_event_from_the_reason() -> None:
    for reason, event in [
        ("cancel", "cancelled"),
        ("no answer", "rejected"),
        ("timeout", "timeout"),
        ("remote-bye", "remote-bye"),
    ]:
        (d,) = dialogs(parse(render("1001", 7, [], DOMAIN, T0 + 9, [ended(reason)])))
        state = d.find("d:state", NS)
        assert state is not None and state.text == "terminated"
        assert state.get("event") == event
        assert d.find("sa:exclusive", NS) is None


def test_bye_without_a_side_has_no_event() -> None:
    (d,) = dialogs(parse(render("1001", 7, [], DOMAIN, T0, [ended("bye")])))
    state = d.find("d:state", NS)
    assert state is not None and state.text == "terminated" and "event" not in state.attrib


def test_current_calls_then_the_terminated_ones() -> None:
    calls = [call(CallState.ACTIVE, call_id="a"), call(CallState.RINGING, None, call_id="b")]
    root = parse(render("1001", 3, calls, DOMAIN, T0, [ended("cancel", "c")]))
    assert [d.get("id") for d in dialogs(root)] == ["a", "b", "c"]


def test_missing_dialog_identifiers_are_omitted() -> None:
    (d,) = dialogs(
        parse(render("1001", 0, [call(CallState.RINGING, None, dialog=None)], DOMAIN, T0))
    )
    assert set(d.attrib) == {"id", "direction"}


def test_names_and_identifiers_are_escaped() -> None:
    nasty = 'Dave "The <Boss>" & Co\x01\udcff'
    c = call(
        CallState.ACTIVE,
        remote="a b<c>",
        remote_name=nasty,
        dialog=('x"<&>', "t&1", "t<2"),
        call_id='id"&',
    )
    body = render("1001", 1, [c], DOMAIN, T0, names={"1002": "Bob & <Alice>"})
    body.decode("utf-8")  # a lone surrogate never reaches the wire
    (d,) = dialogs(parse(body))
    assert d.get("id") == 'id"&' and d.get("call-id") == 'x"<&>'
    assert d.get("local-tag") == "t&1" and d.get("remote-tag") == "t<2"
    remote = d.find("d:remote/d:identity", NS)
    assert remote is not None and remote.get("display") == 'Dave "The <Boss>" & Co\ufffd\ufffd'
    assert remote.text == "sip:a%20b%3Cc%3E@127.0.0.1"
    local = d.find("d:local/d:identity", NS)
    assert local is not None and local.get("display") == "Bob & <Alice>"


def test_sip_uri_escapes_only_what_a_user_part_cannot_hold() -> None:
    assert sip_uri("+1555;x=y", "d") == "sip:+1555;x=y@d"
    assert sip_uri("é", "d") == "sip:%C3%A9@d"


def test_one_rendering_serves_every_version() -> None:
    doc = document("1001", [call(CallState.ACTIVE)], DOMAIN, T0, names=NAMES)
    for version in (0, 1, 41):
        assert doc.body(version) == render(
            "1001", version, [call(CallState.ACTIVE)], DOMAIN, T0, names=NAMES
        )
        assert parse(doc.body(version)).get("version") == str(version)
