"""Framework backends (installed as airmlx.backends): the only code that imports mlx or torch."""
