"""Using a trained run: loading it, predicting, evaluating, exporting."""
