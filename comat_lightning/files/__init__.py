"""Files the framework reads and writes: user paths, atomic writes, mask encodings, image grids."""
