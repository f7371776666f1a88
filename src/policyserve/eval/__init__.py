"""policyserve.eval."""
