"""Asset factories: each takes the partitions definition of the active catalog."""
