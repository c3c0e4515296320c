"""Govern agents written with other frameworks: each module wraps one framework's tools so
that every call is a governed step of a tether run (tether.external), and imports that
framework only there, behind its extra: `tether[pydantic-ai]`, `tether[openai-agents]`,
`tether[langgraph]`."""
