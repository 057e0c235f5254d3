"""Scalar field types of the operator config, with operator-friendly errors.

These live apart from the models because they encode YAML pitfalls rather
than telephony: YAML turns ``1001`` into an integer, ``0123`` into 123 (the
leading zero is gone), ``+15550101001`` into an integer without its ``+``,
and ``*8`` into an alias. Each validator here either undoes a pitfall safely
or refuses the value with a message telling the operator to quote it.

Validators raise ``ValueError`` (pydantic reports it as ``value_error``); the
loader shows the bare message, so messages are written for operators.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, PlainValidator

__all__ = [
    "MAX_EXTENSION_DIGITS",
    "Extension",
    "FeatureCode",
    "IPAddress",
    "IPNetwork",
    "Int",
    "Number",
    "Text",
    "parse_host_port",
    "parse_ip_address",
]

MAX_EXTENSION_DIGITS = 16

_EXTENSION_RE = re.compile(rf"[0-9]{{1,{MAX_EXTENSION_DIGITS}}}")
# E.164: a '+', a non-zero country code digit, at most 15 digits in all.
_NUMBER_RE = re.compile(r"\+[1-9][0-9]{1,14}")
_FEATURE_CODE_RE = re.compile(r"[*#][0-9]{1,8}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _yaml_text(value: Any) -> Any:
    """Accept an unquoted YAML integer where a digit string is meant.

    ``extension: 1001`` is the natural way to write an extension, so a plain
    integer is turned back into its digits. But YAML already lost the text of
    ``0123`` (it is 123), ``1_000`` or ``0x1F``; ruamel hands those over as
    ``int`` *subclasses* that remember the formatting, so anything that is an
    int but not exactly ``int`` is refused rather than silently changed.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a string, got the boolean {str(value).lower()}")
    if isinstance(value, int):
        if type(value) is not int:
            raise ValueError(
                "write this number in quotes: YAML reads an unquoted number with a leading "
                "zero, '_' or a base prefix as a different integer, so its digits would change"
            )
        return str(value)
    return value


def _check_extension(value: str) -> str:
    if not _EXTENSION_RE.fullmatch(value):
        raise ValueError(f"an extension is 1 to {MAX_EXTENSION_DIGITS} digits, got {value!r}")
    return value


def _check_number(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            'write the number in quotes, e.g. "+15550101001": YAML reads an unquoted '
            "+digits as an integer and drops the '+'"
        )
    if isinstance(value, str) and not _NUMBER_RE.fullmatch(value):
        raise ValueError(
            f"a number is E.164: '+' then 2 to 15 digits not starting with 0, got {value!r}"
        )
    return value


def _check_text(value: str) -> str:
    """Refuse empty and control characters.

    Names end up in SIP display names: a CR/LF there would let a config
    inject header lines into every request that carries the name.
    """
    if not value.strip():
        raise ValueError("must not be empty")
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain control characters (such as newlines or tabs)")
    return value


def _check_feature_code(value: Any) -> Any:
    if value is None:
        # '#78' unquoted is a YAML comment, leaving the value empty.
        raise ValueError(
            'empty feature code: write it in quotes, e.g. "*8" or "#78" '
            "(an unquoted # starts a YAML comment and * an alias)"
        )
    if isinstance(value, str) and not _FEATURE_CODE_RE.fullmatch(value):
        raise ValueError(f"a feature code is '*' or '#' followed by 1 to 8 digits, got {value!r}")
    return value


def parse_ip_address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP literal; refuse host names because softswitch does no DNS."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address as a string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z0-9.-]*[A-Za-z][A-Za-z0-9.-]*", text):
        raise ValueError(
            f"{value!r} is a host name; use an IP address (softswitch does no DNS lookups)"
        ) from None
    raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 address") from None


def _parse_ip_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a network such as "10.0.0.0/8", got {type(value).__name__}')
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        # strict=True refuses "10.0.0.1/8": the operator probably meant one
        # host or the whole /8, and guessing wrong widens the trust.
        raise ValueError(f"{value!r} is not a network in CIDR form: {exc}") from None


def parse_host_port(text: str) -> tuple[str, str]:
    """Split ``ADDR:PORT`` or ``[IPV6]:PORT`` into its two texts.

    Unbracketed IPv6 is refused: in ``::1:5060`` the port is ambiguous.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        return text[1:end], text[end + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected ADDRESS:PORT, got {text!r}")
    if ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:5060, got {text!r}")
    return host, port


#: An integer that must really be an integer in the YAML: no booleans
#: (``ring_time: yes`` would be 1) and no strings.
Int = Annotated[int, Field(strict=True)]

#: Text an operator writes by hand: not blank, no control characters.
Text = Annotated[str, BeforeValidator(_yaml_text), AfterValidator(_check_text)]

#: An extension: 1..16 digits; an unquoted YAML integer is accepted.
Extension = Annotated[str, BeforeValidator(_yaml_text), AfterValidator(_check_extension)]

#: An E.164-like number such as "+15550101001"; must be quoted in YAML.
Number = Annotated[str, BeforeValidator(_check_number)]

#: A dialled feature code such as "*8".
FeatureCode = Annotated[str, BeforeValidator(_check_feature_code)]

#: An IPv4 or IPv6 literal (never a host name).
IPAddress = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    PlainValidator(parse_ip_address),
    PlainSerializer(str),
]

#: An IPv4 or IPv6 network in CIDR form; a bare address means a /32 or /128.
IPNetwork = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_parse_ip_network),
    PlainSerializer(str),
]
