"""Transfer learning on a frozen backbone: cached features, the linear probe, the head search."""
