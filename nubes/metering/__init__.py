"""Usage accounting: the meter keeps usage intervals in the store, the report adds them up."""
