"""Lightning callbacks: first-stage export, image logging, data health (FID/CLIP-score follow)."""
