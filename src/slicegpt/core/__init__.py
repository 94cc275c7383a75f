"""The algorithm: invariance, statistics and bases, weight transforms, and the layer-streaming engine."""
