"""pstrain parameter-server shards (the distributed runtime builds here)."""
