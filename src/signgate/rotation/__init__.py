"""Key rotation across a registry: inventory, plan, journal, settings, the policy hook, the
verifiers' confirmations, and the rotation itself."""
