"""Exceptions of the media package, one class per failure the B2BUA reacts to differently."""

from __future__ import annotations


class MediaError(Exception):
    """Base class: anything media/ raises on purpose."""


class SdpError(MediaError, ValueError):
    """The SDP body is malformed: the B2BUA answers 400 (or 488) instead of relaying it."""


class PortsExhausted(MediaError):
    """No RTP/RTCP port pair is free (or bindable): the B2BUA answers 503, the service lives on."""


class EndpointClosed(MediaError):
    """The endpoint was released: it can no longer be bridged or given a remote address."""


class BridgeError(MediaError):
    """A bridge cannot be built, e.g. an endpoint is already part of another bridge."""
