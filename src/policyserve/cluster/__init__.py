"""Ray in one place: starting or joining a Ray cluster, and the worker pool that runs tasks on it."""
