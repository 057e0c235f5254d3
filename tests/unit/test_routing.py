"""Routing: who rings for a dialled string, feature codes, calling on behalf."""

from __future__ import annotations

from dialplan import Permission, load_config_text
from dialplan.routing import CallRoute, FeatureRoute, NoRoute, Role, may_act_as, route_call

CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
users:
  - {extension: "1001", name: Alice Exec, password: s1, number: "+15550101001"}
  - {extension: "1002", name: Bob Assistant, password: s2}
  - {extension: "1003", name: Carol Assistant, password: s3}
  - {extension: "1004", name: Dave, password: s4, dnd: true}
  - {extension: "1005", name: Eve, password: s5}
delegations:
  - delegator: "1001"
    ring_time: 20
    delegates:
      - "1002"
      - {extension: "1003", permissions: [pickup], ring_delay: 0}
      - {extension: "1005", permissions: [answer], ring_delay: 5}
"""
POLICY_OFF = CONFIG + "policy: {delegation: false}\n"


def test_line_rings_owner_and_answering_delegates() -> None:
    cfg = load_config_text(CONFIG)
    r = route_call(cfg, "1001")
    assert isinstance(r, CallRoute) and r.shared and r.ring_time == 20
    assert [(t.extension, t.role, t.delay) for t in r.targets] == [
        ("1001", Role.OWNER, 0),
        ("1002", Role.DELEGATE, 0),
        ("1005", Role.DELEGATE, 5),
    ]


def test_number_routes_to_its_user() -> None:
    cfg = load_config_text(CONFIG)
    r = route_call(cfg, "+15550101001")
    assert isinstance(r, CallRoute) and r.line == "1001"
    assert isinstance(route_call(cfg, "15550101001"), CallRoute)


def test_opt_out_and_dnd_remove_targets() -> None:
    cfg = load_config_text(CONFIG)
    r = route_call(cfg, "1001", opted_out={("1001", "1002")}, dnd={"1005"})
    assert isinstance(r, CallRoute) and [t.extension for t in r.targets] == ["1001"]
    dave = route_call(cfg, "1004")
    assert isinstance(dave, CallRoute) and dave.targets == ()


def test_policy_off_rings_the_delegator_alone() -> None:
    cfg = load_config_text(POLICY_OFF)
    r = route_call(cfg, "1001")
    assert isinstance(r, CallRoute) and [t.extension for t in r.targets] == ["1001"]
    assert not r.shared
    assert not may_act_as(cfg, "1002", "1001", Permission.PLACE)


def test_feature_codes_take_digit_arguments() -> None:
    cfg = load_config_text(CONFIG)
    assert route_call(cfg, "*8") == FeatureRoute("pickup", "")
    assert route_call(cfg, "*91001") == FeatureRoute("retrieve", "1001")
    assert isinstance(route_call(cfg, "*9abc"), NoRoute)
    assert isinstance(route_call(cfg, "*55"), NoRoute)
    assert isinstance(route_call(cfg, "9999"), NoRoute)


def test_may_act_as_needs_the_permission() -> None:
    cfg = load_config_text(CONFIG)
    assert may_act_as(cfg, "1002", "1001", Permission.PLACE)
    assert not may_act_as(cfg, "1003", "1001", Permission.PLACE)
    assert may_act_as(cfg, "1003", "1001", Permission.PICKUP)
    assert not may_act_as(cfg, "1004", "1001", Permission.PLACE)
    assert may_act_as(cfg, "1004", "1004", Permission.PLACE)
