"""Key rotation across a registry: inventory, plan, journal, and the rotation itself."""
