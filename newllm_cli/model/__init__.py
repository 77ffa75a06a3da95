"""The network: context blocks, the next-token head, the recurrence kernels and sampling."""
