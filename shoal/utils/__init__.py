"""Small helpers shared by the servers and the client (no user-facing API)."""
