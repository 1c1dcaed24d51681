"""Placeholder: replaced by the simulator."""


def synthetic_screen(*args, **kwargs):
    """Not written yet."""
    raise NotImplementedError
