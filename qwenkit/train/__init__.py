"""Finetuning (full, LoRA, Q-LoRA) on the official data format: `data` (preprocess), `setup` (settings, model
preparation, optimizer), `loop` (training, checkpoints, resume, DDP), `state` (resumable checkpoints).

The LoRA module and peft's adapter files live in `qwenkit.checkpoints` so inference can load adapters.
"""
