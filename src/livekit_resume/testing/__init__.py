"""Test kits that ship with livekit-resume, for its own tests and for yours.

``testing.llm``: `ScriptedLLM`, a deterministic ``llm.LLM`` that answers from a script
(``livekit-resume demo`` runs on it too).
``testing.conformance``: `StoreConformance`, the store conformance suite for any backend
(needs pytest and pytest-asyncio).
``testing.poll``: `eventually()`, wait for a condition reached on a store's or server's
own clock.

The library's core never imports this package.
"""
