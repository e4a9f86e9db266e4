"""Storage backends for images (L{IImageStore} implementations)."""
