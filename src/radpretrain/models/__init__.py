"""Models: the timm backbone factory, the U-Net for Models Genesis, and encoder weight files."""
