"""livekit-resume: resumable LiveKit voice agents."""
