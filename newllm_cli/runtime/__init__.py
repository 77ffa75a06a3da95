"""The process: errors, progress and logs, interrupts, locks and torchrun process groups."""
