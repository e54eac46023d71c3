"""LoRA-A2's base as the GMFL authors' code has it (spec GMFL.md section 7.4): FedIT with alternating freeze."""
