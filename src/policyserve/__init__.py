"""policyserve."""
