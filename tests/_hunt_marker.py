"""Imported by nothing in livekit-resume: a test checks an agent id naming it is never imported."""

raise RuntimeError("tests._hunt_marker must never be imported by livekit-resume")
