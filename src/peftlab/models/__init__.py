"""peftlab.models."""
