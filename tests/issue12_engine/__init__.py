"""The metric engine exactly as issue 12 left it (commit 8b0b3a4), before the speed-ups of
issue 11: the straightforward paths that the fast ones must reproduce bit for bit."""
