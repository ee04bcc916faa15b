"""Traffic policy: who may send how much, and where it goes."""
