"""Fleet mode: keys shared by every daemon on one store (Redis), one file a job:

=========== ========================================================================
url         the store's URL, checked without importing redis; shown without password
state       a fleet key's state and every step on it (pure; the store's time passed in)
store       Redis: transactions on a key's state, its event stream, heartbeats, index
messages    a fleet key's state and events as protocol messages and status rows
waiting     this host's waiters of fleet keys, and each event delivered to them once
coordinator this daemon's part: submissions, claims, runs here, reading events, scans
=========== ========================================================================

Only a daemon started with a store imports ``store`` and ``coordinator`` (and so redis).
"""
