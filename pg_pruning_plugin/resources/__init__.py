"""What the package reads and writes: offline assets, models, text sources, atomic files."""
