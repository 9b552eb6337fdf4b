"""The tiered page store: page index, tiers, the demotion mover, the policy interface."""
