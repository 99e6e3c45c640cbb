"""System heterogeneity: device populations (speed, bandwidth, availability) and the clock."""
