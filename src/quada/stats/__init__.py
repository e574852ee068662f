"""Statistics: rates and paired differences with their intervals, the sequential design and the verdicts."""
