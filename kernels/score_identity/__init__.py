"""K2 skeleton: SiD / SIM / score forgetting (op layer lands in this package)."""
