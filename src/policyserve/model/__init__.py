"""policyserve.model."""
