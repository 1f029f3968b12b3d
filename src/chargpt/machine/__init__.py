"""The machine: free cores and threads, memory estimates, which number format is faster here."""
