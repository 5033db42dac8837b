"""One module per real server; `syncworker.sandbox.catalog` maps names to them."""
