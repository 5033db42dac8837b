"""Contract doubles: in-process HTTP servers that behave like a vendor's API, for peers that cannot run here.

Each double is named as such (KongAdminDouble, ApisixAdminDouble), cites the
vendor documentation it follows in its module docstring, and is pinned by the
`test_*_double.py` tests next to it. They listen on loopback only.
"""
