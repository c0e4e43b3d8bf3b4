"""HTTP API: protocol schemas (`schemas`), error format (`errors`) and routes (`routes`)."""
