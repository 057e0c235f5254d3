"""End-to-end tests: the softswitch started from its CLI, driven by real SIP peers."""
