"""Data: manifests, the held-out split, video I/O, the clip dataset and the latent cache."""
