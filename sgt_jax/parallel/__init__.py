"""Device mesh, the logical-axis rules table, multi-host setup."""
