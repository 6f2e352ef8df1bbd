"""K3/K5 skeleton: consistency and DSM losses (op layer lands in this package)."""
