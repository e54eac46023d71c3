"""FedEx-LoRA (spec GMFL.md section 7.2): FedIT's factors averaged uniformly, the averaging error folded into W0."""
