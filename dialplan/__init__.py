"""The operator's configuration: YAML in, a validated, frozen ``Config`` out.

This package is deliberately independent of the SIP stack (``softswitch``)
and of ``media``: the config is the contract between the operator and the
switch, so it can be loaded, checked and tested without starting anything.

Typical use::

    from dialplan import ConfigError, load_config

    try:
        cfg = load_config("conf/softswitch.yaml")
    except ConfigError as exc:
        print(exc)  # one "FILE:LINE: FIELD: MESSAGE" per problem
"""

from dialplan.errors import ConfigError, ConfigIssue
from dialplan.loader import (
    default_config_path,
    load_config,
    load_config_text,
    load_default_config,
)
from dialplan.models import (
    ALL_PERMISSIONS,
    MAX_DELEGATES,
    MAX_DELEGATORS,
    Algorithm,
    Auth,
    Config,
    Delegate,
    Delegation,
    FeatureCodes,
    HostPort,
    Lines,
    ListenSpec,
    Log,
    Media,
    Overload,
    Permission,
    Policy,
    PortRange,
    Registrar,
    Tcp,
    User,
)

__all__ = [
    "ALL_PERMISSIONS",
    "MAX_DELEGATES",
    "MAX_DELEGATORS",
    "Algorithm",
    "Auth",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Delegate",
    "Delegation",
    "FeatureCodes",
    "HostPort",
    "Lines",
    "ListenSpec",
    "Log",
    "Media",
    "Overload",
    "Permission",
    "Policy",
    "PortRange",
    "Registrar",
    "Tcp",
    "User",
    "default_config_path",
    "load_config",
    "load_config_text",
    "load_default_config",
]
