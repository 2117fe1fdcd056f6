"""Control plane and entry points of moe-serve (deployment, supervisor, CLI)."""
