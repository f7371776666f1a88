"""policyserve.data."""
