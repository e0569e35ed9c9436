"""Offline evaluation: reconstruction quality and the Fashion-MNIST classifier as a judge."""
