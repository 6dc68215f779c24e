"""Pictures: training curves, masks, reconstructions, attention maps, and the HTML report."""
