"""Ray in one place: ``runtime`` starts or joins a Ray cluster for a run; ``pool`` is the generic worker pool
that hands work items to Ray actors, replaces dead ones and counts every item once (the eval workers that run on
it live in :mod:`policyserve.eval.distributed`, the policy replicas in :mod:`policyserve.serving.ray_backend`)."""
