"""Test kits that ship with livekit-resume, for its own tests and for yours.

Nothing here is imported by the library itself.
"""
