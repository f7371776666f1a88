"""Front doors: each translates one wire protocol to typed requests and outcomes, nothing else."""
