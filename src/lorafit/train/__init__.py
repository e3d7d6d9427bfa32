"""Training: `lorafit train` (run.py) on the Hugging Face Trainer, with lorafit's arguments and reports."""
