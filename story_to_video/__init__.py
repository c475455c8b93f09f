"""story-to-video: one-line idea to finished video on one local GPU."""

__version__ = "0.1.0"
