"""The control plane: desired state, signed snapshots and their distribution.

:mod:`.subscriber` is the subscriber side (what an execution host runs): it
verifies signed snapshots and keeps the last good one on disk under a bounded
lease. It depends only on the control contract, so a host that reaches the
control plane over gRPC uses it as is. The plane's plugin lands with issue 5.
"""
