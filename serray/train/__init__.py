"""Training: one Ray Train loop (loop.py) serving pre-training (pretrain.py) and fine-tuning (finetune.py)."""
