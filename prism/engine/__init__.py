"""Pure stage cores: encoder, prefill and decode engines. No gRPC, no Redis."""
