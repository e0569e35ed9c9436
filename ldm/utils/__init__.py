"""Small helpers shared across packages (config resolvers, hardware probes)."""
