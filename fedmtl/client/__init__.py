"""What runs at a client: its data, local training (one client or a batched shard), its
personal step and the store that keeps its personal state."""
