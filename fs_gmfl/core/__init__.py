"""Host-agnostic algorithm cores (pure torch + peft; no FederatedScope, no simulator)."""
