"""dpmix-ray: privacy-budgeted DP-Mix recipe search."""
