"""Harness for the end-to-end tests: the service from its CLI, SIPp, baresip, a raw SIP client.

Everything binds to and talks to 127.0.0.1 only, every wait is bounded, and every process is
started in its own session so cleanup can kill exactly what a test started.
"""
