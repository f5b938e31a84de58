"""Projects built on the kappa engine, each using only what a user's project could use."""
