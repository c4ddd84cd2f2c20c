"""peftlab.lab."""
