"""Serving: a continuous-batching engine over KV-cache slots (engine.py schedules, slots.py holds the compiled pool
functions), and the OpenAI-compatible HTTP layer over it (api.py routes, protocol.py request checks)."""
