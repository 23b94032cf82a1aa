"""The four generation stages and the subscriber runner that wraps any of them."""
