"""Test kits that ship with livekit-resume, for its own tests and for yours.

``testing.llm``: `ScriptedLLM`, a deterministic ``llm.LLM`` that answers from a script
(``livekit-resume demo`` runs on it too). The library's core never imports this package.
"""
