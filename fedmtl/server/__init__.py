"""What runs at the coordinator: who takes part (dispatch), the hierarchical aggregation
(within groups, then across), the server optimisers, the robust rules and the Byzantine
clients they are tested against, and the grouping of clients."""
