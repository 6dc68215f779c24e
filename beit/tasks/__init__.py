"""Tasks: pretraining, fine-tuning, probes, segmentation (each = heads + data + metric on the one engine)."""
