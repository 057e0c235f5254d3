"""The sans-I/O SIP core: messages, URIs, digest auth and transactions.

Nothing in this package imports asyncio, opens a socket or reads a clock: callers feed bytes and the
current time in, and take messages, events and deadlines out. That keeps every RFC rule testable
with a fake clock (the h11/aioquic pattern) and lets the transport layer stay thin.
"""
