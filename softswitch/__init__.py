"""softswitch: an asyncio SIP softswitch with call delegation on shared lines."""

__version__ = "0.1.0"
