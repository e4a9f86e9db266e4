"""Public test tooling: a criu that speaks the local protocols, trace replay, the demo."""
