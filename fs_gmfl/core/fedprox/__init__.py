"""FedProx (Li et al., MLSys 2020): FedIT whose clients add a proximal term to their local loss."""
