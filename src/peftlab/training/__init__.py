"""peftlab.training."""
