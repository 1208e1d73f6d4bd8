"""Local mode: the whole system on one machine against moto's server over HTTP."""
