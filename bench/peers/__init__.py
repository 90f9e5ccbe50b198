"""Peers measured next to the sidecar in the same run (`make bench-peers`, bench.peers.run)."""
