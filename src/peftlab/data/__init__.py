"""peftlab.data."""
