"""policyserve.cli."""
