"""policyserve.protocol."""
