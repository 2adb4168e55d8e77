"""``python -m livekit_resume``: the same command line as ``livekit-resume``."""

from .cli import main

if __name__ == "__main__":
    main()
