"""Drop-ins for the training libraries distillation users run (each importable without that library installed)."""
