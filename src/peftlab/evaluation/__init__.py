"""peftlab.evaluation."""
