"""Offline synthetic twins of the DCL and ACL streams, in the release format."""

from mllmcl.data.synthetic.writer import SyntheticSpec, ensure_synthetic, write_synthetic

__all__ = ["SyntheticSpec", "ensure_synthetic", "write_synthetic"]
