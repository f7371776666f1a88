"""policyserve.sim."""
