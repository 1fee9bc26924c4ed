"""Tensor-parallel process state and collectives (torch.distributed). Imports: torch only."""
