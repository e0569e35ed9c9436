"""The demo (``make demo``): plan both stages' budgets from rates measured on this machine, then run them."""
