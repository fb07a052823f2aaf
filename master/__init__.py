"""pstrain master: validation, graph passes, planning and job tracking (distributed runtime)."""
