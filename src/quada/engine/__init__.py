"""Running the work: the plan of a command's measurements, its units, and the executors that run them."""
