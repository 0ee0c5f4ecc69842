"""The comparison report: reads run records only (never live objects)."""
