"""GPU resource broker: reads VRAM, predicts each stage's peak, and acts before it."""
