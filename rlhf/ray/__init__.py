"""Ray at the edge: a session helper, a worker group (placement group + fan-out/gather) and
the thin remote wrappers that run the plain stage and role classes as actors."""
