"""Video files: reading (PyAV / torchcodec, frame folders) and writing (MP4, GIF, grids of clips)."""
