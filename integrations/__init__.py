"""Bridges from an mmrag Index to other frameworks (LangChain, diffusers); each behind an extra."""
